"""Serving: request parsing for every bad input, the archive + handler on TorchServe's own context
class, and (``-m server``) a real TorchServe 0.12 on loopback with token auth and two products."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import re
import shutil
import socket
import stat
import struct
import subprocess
import urllib.parse
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components import supervisor
from components.naming import torchserve_model_name
from components.serving import server
from components.serving.archive import build_archive, read_manifest
from components.serving.handler import TFANetHandler
from components.serving.parity import check_parity
from components.serving.payload import (
    MAX_BODY_BYTES,
    STATUS_OF_REFUSAL,
    RequestError,
    decode_map,
    encode_map,
    parse_request,
)
from components.serving.torchserve import TorchServeClient
from tfanet_core import cli
from tfanet_core.bundle import METADATA_FILE, WEIGHTS_FILE
from tfanet_core.config import load_config
from tfanet_core.data.images import MAX_PIXELS, MIN_SIDE, REFUSALS, to_rgb
from tfanet_core.data.manifest import ManifestError, build_manifest
from tfanet_core.features import sha256_file
from tfanet_core.predictor import Predictor

OCTET = "application/octet-stream"
JSON_TYPE = "application/json"


# -- test images ----------------------------------------------------------------------------------
def _encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _raw_png(width: int, height: int, depth: int = 8, color: int = 0) -> bytes:
    """A valid PNG written row by row (never holds the pixels): 10000×10000 costs ~100 KB, and
    16-bit RGB is possible (Pillow cannot write it)."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color]
    row = b"\x00" + b"\x00" * (width * channels * depth // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _json(doc: object) -> bytes:
    return json.dumps(doc).encode()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def bad_inputs(good: bytes) -> list[tuple[str, bytes, str, int]]:
    """(name, body, content type, expected status) for every input the endpoint must refuse."""
    jpeg = _encode(Image.open(io.BytesIO(good)).convert("RGB"), "JPEG")
    gray16 = _encode(Image.fromarray(np.full((64, 64), 40000, np.uint16)))
    return [
        ("empty body", b"", OCTET, 400),
        ("non-image bytes", b"this is a text file, not an image\n" * 20, OCTET, 415),
        ("GIF instead of PNG/JPEG", _encode(Image.new("P", (64, 64)), "GIF"), OCTET, 415),
        ("truncated PNG", good[: len(good) // 2], OCTET, 422),
        ("truncated JPEG", jpeg[: len(jpeg) // 2], OCTET, 422),
        ("PNG with a corrupt chunk type", good[:40] + bytes([good[40] ^ 0xFF]) + good[41:], OCTET, 422),
        ("PNG with a broken CRC", good[:100] + bytes([good[100] ^ 0xFF]) + good[101:], OCTET, 422),
        ("1x1 image", _encode(Image.new("RGB", (1, 1))), OCTET, 422),
        ("10000x10000 image", _raw_png(10_000, 10_000), OCTET, 413),
        ("16-bit grayscale PNG", gray16, OCTET, 422),
        ("16-bit RGB PNG", _raw_png(64, 64, depth=16, color=2), OCTET, 422),
        ("malformed JSON", b'{"image": "iVBOR', JSON_TYPE, 400),
        ("JSON array", b"[1, 2, 3]", JSON_TYPE, 400),
        ("JSON without image", _json({"return_map": True}), JSON_TYPE, 400),
        ("unknown JSON field", _json({"image": _b64(good), "returnMap": True}), JSON_TYPE, 400),
        ("return_map not a boolean", _json({"image": _b64(good), "return_map": "maybe"}), JSON_TYPE, 400),
        ("wrong base64", _json({"image": "this is *not* base64!"}), JSON_TYPE, 400),
        ("base64 of non-image bytes", _json({"image": _b64(b"hello world")}), JSON_TYPE, 415),
        ("base64 of a 16-bit PNG", _json({"image": _b64(gray16)}), JSON_TYPE, 422),
    ]


def converted_inputs(good: bytes) -> list[tuple[str, Image.Image]]:
    """Inputs that are not bad: converted to RGB exactly as training data is (to_rgb)."""
    rgb = Image.open(io.BytesIO(good)).convert("RGB")
    rgba = rgb.copy()
    rgba.putalpha(Image.linear_gradient("L").resize(rgb.size))
    return [
        ("grayscale", rgb.convert("L")),
        ("grayscale+alpha", rgb.convert("LA")),
        ("RGBA", rgba),
        ("palette", rgb.convert("P")),
    ]


@pytest.fixture(scope="module")
def good_png(synth_root: Path) -> bytes:
    return (synth_root / "fabric" / "test" / "good" / "000.png").read_bytes()


# -- request parsing ------------------------------------------------------------------------------
def test_every_bad_input_is_a_client_error_with_a_message(good_png: bytes) -> None:
    for name, body, _, status in bad_inputs(good_png):
        with pytest.raises(RequestError) as caught:
            parse_request(body)
        assert caught.value.status == status, f"{name}: {caught.value.message}"
        assert len(caught.value.message) > 20, name
        refusal = {"refusal": caught.value.refusal} if caught.value.refusal else {}
        assert caught.value.to_json() == {
            "code": status,
            "type": caught.value.reason,
            "message": caught.value.message,
            **refusal,
        }


def test_server_config_binds_loopback_and_matches_the_parser_limit() -> None:
    assert server.MAX_REQUEST_BYTES == MAX_BODY_BYTES
    config = server.CONFIG_TEMPLATE.format(
        **{f"{k}_port": v for k, v in server.DEFAULT_PORTS.items()},
        model_store="/m",
        token_expiration_min=60,
        max_request_size=server.MAX_REQUEST_BYTES,
        max_response_size=server.MAX_REQUEST_BYTES,
    )
    props = dict(line.split("=", 1) for line in config.splitlines() if line and not line.startswith("#"))
    addresses = [v for k, v in props.items() if k.endswith("_address")]
    assert len(addresses) == 5 and all("127.0.0.1" in a for a in addresses)
    assert props["enable_model_api"] == "true" and "disable_token_authorization" not in props
    assert props["max_request_size"] == str(MAX_BODY_BYTES)


def test_form_encoded_body_is_explained() -> None:
    for body in (None, b"image=abc"):
        with pytest.raises(RequestError) as caught:
            parse_request(body, content_type="application/x-www-form-urlencoded")
        assert caught.value.status == 415 and "application/octet-stream" in caught.value.message


def test_size_limits_are_checked_from_the_header_before_decoding() -> None:
    # Header claims 10000x10000 but the pixel data is cut off: refused as too large (413), not as
    # truncated (422), so the decision was made before any pixel was decoded.
    header_only = _raw_png(10_000, 10_000)[:200]
    with pytest.raises(RequestError) as caught:
        parse_request(header_only)
    assert caught.value.status == 413 and str(MAX_PIXELS) in caught.value.message
    side = MIN_SIDE - 1
    with pytest.raises(RequestError) as caught:
        parse_request(_encode(Image.new("RGB", (side, 400))))
    assert caught.value.status == 422 and f"{side}x400" in caught.value.message


def test_modes_are_converted_like_training_data(good_png: bytes) -> None:
    for name, img in converted_inputs(good_png):
        parsed = parse_request(_encode(img))
        assert parsed.image.mode == "RGB", name
        assert np.array_equal(np.asarray(parsed.image), np.asarray(to_rgb(img))), name
    # RGBA: alpha dropped, colour kept as stored (not composited)
    rgba = dict(converted_inputs(good_png))["RGBA"]
    assert np.array_equal(np.asarray(parse_request(_encode(rgba)).image), np.asarray(rgba)[..., :3])


def test_raw_json_and_flags_decode_to_the_same_image(good_png: bytes) -> None:
    raw = parse_request(good_png)
    as_json = parse_request(_json({"image": _b64(good_png), "return_map": True}))
    already_decoded = parse_request({"image": _b64(good_png)})
    assert np.array_equal(np.asarray(raw.image), np.asarray(as_json.image))
    assert np.array_equal(np.asarray(raw.image), np.asarray(already_decoded.image))
    assert (raw.return_map, as_json.return_map, already_decoded.return_map) == (False, True, False)
    assert parse_request(good_png, return_map="true").return_map is True
    assert parse_request(good_png, return_map=b"0").return_map is False
    with pytest.raises(RequestError) as caught:
        parse_request(good_png, return_map="sometimes")
    assert caught.value.status == 400 and "X-Return-Map" in caught.value.message
    jpeg = _encode(raw.image, "JPEG")
    assert parse_request(jpeg).image.size == raw.image.size


def test_anomaly_map_png_round_trip() -> None:
    amap = np.random.default_rng(0).gamma(2.0, 0.01, size=(128, 128)).astype(np.float32)
    encoded, scale = encode_map(amap)
    assert scale == pytest.approx(float(amap.max()))
    back = decode_map(encoded, scale)
    assert back.shape == amap.shape
    assert np.abs(back - amap).max() <= scale / 65535 * 0.51 + 1e-7
    assert Image.open(io.BytesIO(base64.b64decode(encoded))).mode.startswith("I;16")
    zeros, zero_scale = encode_map(np.zeros((8, 8)))
    assert zero_scale == 0.0 and not decode_map(zeros, zero_scale).any()


# -- archive and handler (TorchServe's own Context class, no server) ------------------------------
@pytest.fixture(scope="module")
def fabric_mar(fabric_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_archive(fabric_bundle, "fabric", "7", tmp_path_factory.mktemp("mar"))


def test_archive_records_product_version_and_bundle(fabric_mar: Path, fabric_bundle: Path) -> None:
    assert fabric_mar.name == "tfanet-fabric.mar"
    manifest = read_manifest(fabric_mar)
    assert (manifest["product"], manifest["model_version"], manifest["model_name"]) == ("fabric", "7", "tfanet-fabric")
    assert manifest["category"] == "fabric" and manifest["bundle"]["backbone"] == "efficientnet_lite0"
    for f in (METADATA_FILE, WEIGHTS_FILE):
        assert manifest["bundle"]["files"][f] == sha256_file(fabric_bundle / f)
    assert manifest["source"] == {"kind": "bundle", "path": str(fabric_bundle.resolve())}
    with zipfile.ZipFile(fabric_mar) as z:
        names = set(z.namelist())
        ts_manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
    assert {"handler.py", "payload.py", "serving.json", "bundle/bundle.json", "bundle/model.pt"} <= names
    assert ts_manifest["model"]["modelVersion"] == "7" and ts_manifest["model"]["modelName"] == "tfanet-fabric"


def test_archive_refuses_bad_names(fabric_bundle: Path, tmp_path: Path) -> None:
    from components.serving.archive import ArchiveError

    with pytest.raises(ArchiveError, match="product"):
        build_archive(fabric_bundle, "fab ric", "1", tmp_path)
    with pytest.raises(ArchiveError, match="version"):
        build_archive(fabric_bundle, "fabric", "1/2", tmp_path)


def _context(model_dir: Path, headers: list[dict[str, object]]):  # type: ignore[no-untyped-def]
    from ts.context import Context, RequestProcessor

    ctx = Context("tfanet-fabric", str(model_dir), None, 4, None, "0.12.0")
    ctx.request_processor = [RequestProcessor(h) for h in headers]
    return ctx


def test_handler_answers_each_request_of_a_batch(fabric_mar: Path, fabric_bundle: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    with zipfile.ZipFile(fabric_mar) as z:
        z.extractall(model_dir)
    handler = TFANetHandler()
    handler.initialize(_context(model_dir, []))
    probe = Image.new("RGB", (96, 80), (120, 90, 60))
    data = [
        {"body": _encode(probe)},
        {"body": b"not an image at all"},
        {"body": _json({"image": _b64(_encode(probe)), "return_map": True})},
        {"body": b""},
        {"body": _encode(probe.convert("L"))},
    ]
    ctx = _context(model_dir, [{"Content-Type": OCTET}] * len(data))
    out = handler.handle(data, ctx)
    assert len(out) == len(data)
    statuses = [ctx.get_response_status(i)[0] for i in range(len(data))]
    assert statuses == [200, 415, 200, 400, 200]
    docs = [json.loads(o) for o in out]
    expected = Predictor.from_bundle(fabric_bundle, device="cpu").predict([probe, to_rgb(probe.convert("L"))])
    for i, ref in ((0, expected[0]), (2, expected[0]), (4, expected[1])):
        assert docs[i]["score"] == pytest.approx(ref.score, abs=1e-5)
        assert (docs[i]["product"], docs[i]["model_version"]) == ("fabric", "7")
        assert docs[i]["threshold"] == ref.threshold and docs[i]["is_anomalous"] == ref.is_anomalous
    assert "anomaly_map" in docs[2] and "anomaly_map" not in docs[0]
    assert docs[1]["code"] == 415 and docs[3]["code"] == 400 and docs[1]["message"]
    assert all(ctx.get_response_content_type(i) == JSON_TYPE for i in range(len(data)))


# -- a real TorchServe ----------------------------------------------------------------------------
@dataclass
class Served:
    client: TorchServeClient
    state: Path
    bundles: dict[str, Path]
    probes: dict[str, list[Path]]


@pytest.fixture(scope="module")
def bracket_bundle(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tfanet_core.workflow import train_category

    out = tmp_path_factory.mktemp("bundles") / "bracket"
    config = load_config("tiny", ["train.epochs=2", "calibration.target_fpr=0.25"])
    train_category(synth_root, "bracket", config, out, device="cpu", progress=False)
    return out


@pytest.fixture(scope="module")
def served(
    fabric_bundle: Path, bracket_bundle: Path, synth_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    state = tmp_path_factory.mktemp("torchserve")
    server.start(state, server.free_ports())
    try:
        client = TorchServeClient.from_state_dir(state)
        bundles = {"fabric": fabric_bundle, "bracket": bracket_bundle}
        for product, bundle in bundles.items():
            mar = build_archive(bundle, product, "1", state / "model_store")
            client.register(mar.name, torchserve_model_name(product), batch_size=4, max_batch_delay_ms=20)
        probes = {
            "fabric": [synth_root / "fabric" / "test" / d / "000.png" for d in ("good", "hole", "stain")],
            "bracket": [synth_root / "bracket" / "test" / d / "000.png" for d in ("good", "scratch", "missing_part")],
        }
        yield Served(client, state, bundles, probes)
    finally:
        server.stop(state)


def _worker_pids(client: TorchServeClient, name: str) -> list[int]:
    return [w["pid"] for v in client.versions(name) for w in v.get("workers", [])]


@pytest.mark.server
def test_requests_without_the_token_are_refused(served: Served, good_png: bytes) -> None:
    client = served.client
    path = "/predictions/tfanet-fabric"
    for token in ("", "wrong-key"):
        refused = client.request("POST", "inference", path, good_png, {"Content-Type": OCTET}, token=token)
        assert refused.status == 400 and "Token" in refused.message  # TorchServe 0.12 answers 400, not 401
        assert client.request("GET", "inference", "/ping", token=token).status == 400
        assert client.request("GET", "management", "/models", token=token).status == 400
    inference_key = client.key("inference")
    assert client.request("GET", "management", "/models", token=inference_key).status == 400  # wrong key kind
    assert client.predict("tfanet-fabric", good_png).status == 200
    assert client.ping()
    assert stat.S_IMODE(Path(client.key_file).stat().st_mode) == 0o600  # type: ignore[arg-type]


@pytest.mark.server
def test_two_products_served_at_once_match_their_bundles(served: Served) -> None:
    assert set(served.client.models()) == {"tfanet-fabric", "tfanet-bracket"}
    for product, bundle in served.bundles.items():
        report = check_parity(served.client, torchserve_model_name(product), bundle, served.probes[product])
        assert report.passed, report.rows
        assert len(report.rows) == 3 and report.max_abs_diff <= 1e-4
    # the check can fail: the bracket bundle is not what serves tfanet-fabric
    wrong = check_parity(served.client, "tfanet-fabric", served.bundles["bracket"], served.probes["fabric"])
    assert not wrong.passed and wrong.max_abs_diff > 1e-4
    # interleaved requests to both products, each answered by its own model
    fabric, bracket = served.probes["fabric"][1], served.probes["bracket"][1]
    jobs = [("fabric", fabric), ("bracket", bracket)] * 4
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda j: served.client.predict(torchserve_model_name(j[0]), j[1].read_bytes()), jobs))
    expected = {
        p: Predictor.from_bundle(served.bundles[p], device="cpu").predict_paths([f])
        for p, f in (("fabric", fabric), ("bracket", bracket))
    }
    for (product, _), resp in zip(jobs, answers, strict=True):
        doc = resp.json()
        assert resp.status == 200 and doc["product"] == product and doc["model_version"] == "1"
        assert doc["score"] == pytest.approx(expected[product][0].score, abs=1e-4)


@pytest.mark.server
def test_bad_input_is_a_4xx_and_the_worker_survives(served: Served, good_png: bytes) -> None:
    client = served.client
    workers = _worker_pids(client, "tfanet-fabric")
    for name, body, content_type, status in bad_inputs(good_png):
        resp = client.predict("tfanet-fabric", body, content_type=content_type)
        assert resp.status == status, f"{name}: {resp.status} {resp.body[:200]!r}"
        doc = resp.json()
        assert doc["code"] == status and len(doc["message"]) > 20, name
    form = client.predict("tfanet-fabric", b"image=abc", content_type="application/x-www-form-urlencoded")
    assert form.status == 415 and "octet-stream" in form.message
    # grayscale, RGBA, palette: accepted and scored like the same image converted by to_rgb
    predictor = Predictor.from_bundle(served.bundles["fabric"], device="cpu")
    for name, img in converted_inputs(good_png):
        resp = client.predict("tfanet-fabric", _encode(img))
        assert resp.status == 200, name
        assert resp.json()["score"] == pytest.approx(predictor.predict([to_rgb(img)])[0].score, abs=1e-4), name
    # a multipart upload (curl -F image=@part.png) names its field; the handler takes it
    boundary = "tfanet-test-boundary"
    multipart = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="part.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
        + good_png
        + f"\r\n--{boundary}--\r\n".encode()
    )
    resp = client.predict("tfanet-fabric", multipart, content_type=f"multipart/form-data; boundary={boundary}")
    assert resp.status == 200, resp.body[:200]
    [ref] = predictor.predict_paths([served.probes["fabric"][0]])  # the file good_png was read from
    assert resp.json()["score"] == pytest.approx(ref.score, abs=1e-4)
    # still answering correctly, by the same worker process (none died and was restarted)
    assert check_parity(client, "tfanet-fabric", served.bundles["fabric"], served.probes["fabric"]).passed
    assert _worker_pids(client, "tfanet-fabric") == workers


@pytest.mark.server
def test_oversized_body_is_refused_by_the_server(served: Served) -> None:
    """Bodies over max_request_size never reach a worker: TorchServe answers 413 from the headers."""
    host, port = served.client.inference.removeprefix("http://").split(":")
    head = (
        f"POST /predictions/tfanet-fabric HTTP/1.1\r\nHost: {host}\r\nContent-Type: {OCTET}\r\n"
        f"Authorization: Bearer {served.client.key('inference')}\r\nContent-Length: {64 * 1024 * 1024}\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head.encode() + b"\0" * 65536)
        status_line = sock.recv(4096).split(b"\r\n", 1)[0]
    assert status_line.split()[1] == b"413"
    assert served.client.predict("tfanet-fabric", served.probes["fabric"][0].read_bytes()).status == 200


@pytest.mark.server
def test_anomaly_map_on_request(served: Served) -> None:
    probe = served.probes["fabric"][1]
    [ref] = Predictor.from_bundle(served.bundles["fabric"], device="cpu").predict_paths([probe], return_maps=True)
    assert ref.anomaly_map is not None
    by_header = served.client.predict("tfanet-fabric", probe.read_bytes(), return_map=True).json()
    by_json = served.client.predict(
        "tfanet-fabric", _json({"image": _b64(probe.read_bytes()), "return_map": True}), content_type=JSON_TYPE
    ).json()
    assert "anomaly_map" not in served.client.predict("tfanet-fabric", probe.read_bytes()).json()
    for doc in (by_header, by_json):
        amap = decode_map(doc["anomaly_map"], doc["anomaly_map_scale"])
        assert amap.shape == ref.anomaly_map.shape == (128, 128)
        assert np.abs(amap - ref.anomaly_map).max() <= doc["anomaly_map_scale"] / 65535 + 1e-5
        # the pixel threshold's defect region, as tfanet_core's Prediction.pred_mask gives it
        with Image.open(io.BytesIO(base64.b64decode(doc["pred_mask"]))) as mask:
            np.testing.assert_array_equal(np.asarray(mask) > 0, ref.pred_mask)


@pytest.mark.server
def test_versions_batching_default_and_rollback(served: Served, good_png: bytes) -> None:
    """What the deploy step does: add a version, check it, make it default, roll back, remove it."""
    client, name = served.client, "tfanet-fabric"
    mar = build_archive(served.bundles["fabric"], "fabric", "2", served.state / "model_store", filename="fabric-2.mar")
    # a long batch delay so that concurrent requests share a batch: good and bad mixed
    client.register(mar.name, name, batch_size=4, max_batch_delay_ms=1000)
    assert sorted(v["modelVersion"] for v in client.versions(name)) == ["1", "2"]
    assert client.default_version(name) == "1"
    bodies = [good_png, b"garbage", served.probes["fabric"][1].read_bytes(), good_png[:100]]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda b: client.predict(name, b, version="2"), bodies))
    assert [a.status for a in answers] == [200, 415, 200, 422]
    assert answers[0].json()["model_version"] == "2"
    assert check_parity(client, name, served.bundles["fabric"], served.probes["fabric"], version="2").passed
    client.set_default(name, "2")
    assert client.predict(name, good_png).json()["model_version"] == "2"
    client.set_default(name, "1")  # rollback: one call, the old version is still loaded
    assert client.predict(name, good_png).json()["model_version"] == "1"
    client.unregister(name, "2")
    assert [v["modelVersion"] for v in client.versions(name)] == ["1"]


@pytest.mark.server
def test_expired_key_is_renewed_with_the_api_key(served: Served) -> None:
    client = served.client
    key_file = Path(client.key_file)  # type: ignore[arg-type]
    keys = json.loads(key_file.read_text())
    old = keys["inference"]["key"]
    keys["inference"]["expiration time"] = "2000-01-01T00:00:00Z"
    key_file.write_text(json.dumps(keys))
    assert client.ping()  # renewed first, then used
    new = json.loads(key_file.read_text())["inference"]["key"]
    assert new != old
    assert client.request("GET", "inference", "/ping", token=old).status == 400


@pytest.mark.server
def test_a_second_server_runs_beside_and_stops_cleanly(served: Served, tmp_path: Path) -> None:
    """PID file and worker sockets live in the state dir, so two servers coexist; stop leaves nothing."""
    state = tmp_path / "second"
    info = server.start(state, server.free_ports())
    try:
        assert (state / "tmp" / ".model_server.pid").read_text().strip() == str(info.java_pid)
        assert server.status(state)["healthy"] is True
        assert TorchServeClient.from_state_dir(state).models() == []
        assert served.client.ping()  # the first server is unaffected
    finally:
        assert server.stop(state) is True
    assert not supervisor.group_members(info.pgid)
    assert not (state / "key_file.json").exists() and not (state / "server.json").exists()
    assert server.status(state)["running"] is False and server.stop(state) is False
    assert served.client.ping()


def _bad_image(kind: str, good: bytes) -> bytes:
    """One image per refusal kind of the core's decoder (tfanet_core.data.images.REFUSALS)."""
    return {
        "empty": b"",
        "too_large": _raw_png(10_000, 10_000),
        "unsupported_format": b"this is a text file, not an image\n" * 20,
        "corrupt": good[: len(good) // 2],
        "too_small": _encode(Image.new("RGB", (8, 8))),
        "high_bit_depth": _encode(Image.fromarray(np.full((64, 64), 40000, np.uint16))),
    }[kind]


@pytest.mark.server
@pytest.mark.parametrize("kind", REFUSALS)
def test_training_predict_and_endpoint_refuse_a_bad_image_for_the_same_reason(
    kind: str, served: Served, good_png: bytes, synth_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _bad_image(kind, good_png)
    root = tmp_path / "data"
    shutil.copytree(synth_root / "fabric", root / "fabric")
    bad = root / "fabric" / "train" / "good" / "bad.png"
    bad.write_bytes(data)
    with pytest.raises(ManifestError) as refused:  # what `tfanet train` and the prepare step build first
        build_manifest(root, "fabric", progress=False)
    [(path, reason)] = refused.value.problems
    assert path == bad and len(reason) > 20

    assert cli.main(["predict", "--bundle", str(served.bundles["fabric"]), str(bad)]) == 2
    assert capsys.readouterr().err.strip() == f"tfanet predict: error: {bad}: {reason}"

    resp = served.client.predict("tfanet-fabric", data, content_type="image/png")
    assert resp.status == STATUS_OF_REFUSAL[kind], resp.body[:200]
    assert resp.json()["refusal"] == kind and resp.json()["message"] == reason


@pytest.mark.server
def test_the_readme_and_demo_curl_commands_work_when_pasted(served: Served) -> None:
    """README 'Calling the endpoint' and the line `make demo` prints: 200 and a score, Content-Type included."""
    from infra.local.demo import curl_command

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    match = re.search(r"```bash\n(curl [^`]*?/predictions/tfanet-<product>)\n```", readme)
    assert match is not None, "README lost its curl example"
    key = json.loads((served.state / "key_file.json").read_text())["inference"]["key"]
    image = served.probes["fabric"][0]
    pasted = (
        match.group(1)
        .replace("<inference key>", key)
        .replace("<port>", str(urllib.parse.urlparse(served.client.inference).port))
        .replace("<product>", "fabric")
        .replace("@part.png", f"@{image}")
    )
    demo = curl_command(served.client.inference, served.state / "key_file.json", "fabric", str(image))
    expected = Predictor.from_bundle(served.bundles["fabric"], device="cpu").predict_paths([image])[0].score
    for command in (pasted, demo):
        out = subprocess.run(["bash", "-c", command + " -s -w '\\n%{http_code}'"], capture_output=True, text=True)
        body, status = out.stdout.rsplit("\n", 1)
        assert status == "200", (command, out.stdout, out.stderr)
        assert json.loads(body)["score"] == pytest.approx(expected, abs=1e-4)
