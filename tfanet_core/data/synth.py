"""Synthetic MVTec-AD-layout dataset: the embedded default of the demo and the tests.

Real industrial data cannot ship with an MIT project (the public sets are non-commercial),
so ``make demo`` and the test-suite generate their own: two products in the exact MVTec AD
layout, deterministic by seed (byte-identical PNGs), generated in ~2 s of CPU with
vectorised numpy + Pillow.

Products
--------
``fabric`` (texture): a plain-weave cloth with random weave phase, ±4° rotation, ±5 %
thread period, brightness/tint jitter, fibre noise and mottling. Defects: ``scratch``
(a pulled thread: thin bright or dark slightly curved line), ``hole`` (dark irregular
blob), ``stain`` (soft-edged colour shift).

``bracket`` (object): a brushed-metal plate with two mounting holes, a black connector
with gold pins and a paper label with text bars, on a dark belt; pose (±3 px, ±3.5°,
±2.5 % scale, as for a part in a loose fixture), lighting gradient and gain (±10 %), and
label text length vary. Defects: ``scratch``,
``stain`` (oil: dark, bluish-brown) and two *logical* ones: ``missing_part`` (connector,
label or a hole absent; mask = where it should be) and ``misplaced_part`` (connector or
label moved on the plate; mask = where it should be ∪ where it wrongly is).

Masks are pixel-exact 0/255 PNGs: a pixel is in the mask where the defect's opacity is
≥ 0.5 (edges are anti-aliased over about one pixel; stains fade over ~3 px, and the faint
rim outside the mask is what a human annotator would also leave out). Every defect covers
0.4–5 % of the image (re-drawn until it does) and is placed at random.

Hardness: image AUROC of three trivial detectors and one learned baseline, computed with
``sklearn.metrics.roc_auc_score`` in a throw-away script (not part of the package), seed 0,
40 train images, on a large test set (60 good + 30 per defect type) and, in brackets, on
the default one (12 good + 6 per type, so ±0.1 noise):

=========  ===========================  ===================  ==========================  ===============
product    mean |x − mean train image|  image intensity std  max |x − mean| (σ=2 blur)   learned (NN)
=========  ===========================  ===================  ==========================  ===============
fabric     0.54 (0.44)                  0.73 (0.70)          0.77 (0.60)                 1.00 (1.00)
bracket    0.51 (0.43)                  0.48 (0.50)          0.62 (0.51)                 0.84 (0.88)
=========  ===========================  ===================  ==========================  ===============

Global statistics sit at chance because lighting gain and weave phase/pose vary more than
a small defect moves them; the blurred-difference maximum lands at 0.6–0.8 (it finds holes,
some missing labels). "Learned (NN)" = max over patches of the distance to the nearest
training patch of EfficientNet-Lite0 (stages 1–2) features: scratches, holes and stains
≥ 0.99, ``misplaced_part`` 0.76 and ``missing_part`` 0.60 — the logical defects need the
global context a template-based model like TFA-Net has, which is the point of them.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from tfanet_core.data.images import DataError

__all__ = ["DEFECT_TYPES", "PRODUCTS", "generate"]

PRODUCTS: tuple[str, ...] = ("fabric", "bracket")
DEFECT_TYPES: dict[str, tuple[str, ...]] = {
    "fabric": ("scratch", "hole", "stain"),
    "bracket": ("scratch", "stain", "missing_part", "misplaced_part"),
}
_MIN_AREA, _MAX_AREA = 0.004, 0.05  # mask area as a fraction of the image
_MARKER = ".tfanet-synth.json"  # lets a re-run replace its own output, and only its own

Array = np.ndarray


# --------------------------------------------------------------------------- primitives
def _grid(size: int) -> tuple[Array, Array]:
    c = np.arange(size, dtype=np.float32) + 0.5
    return np.meshgrid(c, c, indexing="xy")  # x, y pixel centres


def _noise(rng: np.random.Generator, size: int, sigma: float | tuple[float, float]) -> Array:
    """Smooth Gaussian noise with unit standard deviation."""
    n = gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), sigma, mode="wrap")
    return n / (n.std() + 1e-8)


def _coverage(signed_dist: Array, soft: float = 1.0) -> Array:
    """Opacity from a signed distance in pixels (negative inside), anti-aliased over ``soft`` px."""
    return np.clip(0.5 - signed_dist / soft, 0.0, 1.0)


def _blob_dist(x: Array, y: Array, cx: float, cy: float, r: float, rng: np.random.Generator) -> Array:
    """Signed distance (approx.) to an irregular blob: a circle whose radius wobbles with angle."""
    dx, dy = x - cx, y - cy
    ang = np.arctan2(dy, dx)
    wobble = np.ones_like(ang)
    for k in (2, 3, 5):
        wobble += rng.uniform(0.04, 0.14) * np.cos(k * ang + rng.uniform(0, 2 * np.pi))
    return np.hypot(dx, dy) - r * wobble


def _polyline_dist(x: Array, y: Array, pts: Array) -> Array:
    """Distance to a polyline, vectorised over its segments (no per-pixel loop)."""
    a, b = pts[:-1, :, None, None], pts[1:, :, None, None]
    ab = b - a
    px, py = x[None] - a[:, 0], y[None] - a[:, 1]
    t = np.clip((px * ab[:, 0] + py * ab[:, 1]) / (ab[:, 0] ** 2 + ab[:, 1] ** 2 + 1e-8), 0, 1)
    return np.sqrt((px - t * ab[:, 0]) ** 2 + (py - t * ab[:, 1]) ** 2).min(axis=0)


def _box_dist(u: Array, v: Array, cu: float, cv: float, hu: float, hv: float, r: float = 0.0) -> Array:
    """Signed distance to a rounded box (centre, half sizes, corner radius) in the same units as u, v."""
    qu, qv = np.abs(u - cu) - hu + r, np.abs(v - cv) - hv + r
    outside = np.hypot(np.maximum(qu, 0), np.maximum(qv, 0))
    return outside + np.minimum(np.maximum(qu, qv), 0) - r


def _to_png(img: Array, path: Path) -> None:
    arr = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    Image.fromarray(arr, mode="RGB" if arr.ndim == 3 else "L").save(path, format="PNG")


def _lerp(img: Array, target: Array, alpha: Array) -> Array:
    a = alpha[..., None]
    return img * (1 - a) + target * a


# --------------------------------------------------------------------------- defects shared by products
def _scratch(rng: np.random.Generator, size: int, centre: tuple[float, float]) -> Array:
    """Opacity of a thin, slightly curved line through ``centre``."""
    x, y = _grid(size)
    k = size / 128
    length = rng.uniform(0.3, 0.5) * size
    ang = rng.uniform(0, np.pi)
    d = np.array([math.cos(ang), math.sin(ang)], dtype=np.float32)
    nrm = np.array([-d[1], d[0]], dtype=np.float32)
    t = np.linspace(-0.5, 0.5, 9, dtype=np.float32)[:, None]
    bend = rng.uniform(-0.08, 0.08) * length * (1 - (2 * t) ** 2)  # gentle arc
    pts = np.asarray(centre, dtype=np.float32) + t * length * d + bend * nrm
    width = max(1.2, rng.uniform(1.4, 2.4) * k)
    return _coverage(_polyline_dist(x, y, pts) - width / 2)


def _stain(rng: np.random.Generator, size: int, centre: tuple[float, float], radius: tuple[float, float]) -> Array:
    x, y = _grid(size)
    k = size / 128
    r = rng.uniform(*radius) * k
    return _coverage(_blob_dist(x, y, *centre, r, rng), soft=3.0 * k)


def _area_ok(mask: Array) -> bool:
    return _MIN_AREA <= mask.mean() <= _MAX_AREA


# --------------------------------------------------------------------------- fabric
def _fabric(rng: np.random.Generator, size: int) -> Array:
    x, y = _grid(size)
    k = size / 128
    th = math.radians(rng.uniform(-4, 4))  # Python floats keep the arrays float32
    period = 6.0 * k * rng.uniform(0.95, 1.05)
    u = (math.cos(th) * x + math.sin(th) * y) / period + rng.uniform(0, 2)
    v = (-math.sin(th) * x + math.cos(th) * y) / period + rng.uniform(0, 2)
    fu, fv = u - np.floor(u), v - np.floor(v)
    warp_on_top = (np.floor(u) + np.floor(v)) % 2 == 0
    warp = np.sin(np.pi * fu) ** 0.7 * (0.65 + 0.35 * np.sin(np.pi * fv))
    weft = np.sin(np.pi * fv) ** 0.7 * (0.65 + 0.35 * np.sin(np.pi * fu))
    height = gaussian_filter(np.where(warp_on_top, warp, weft), 0.6 * k)
    base = np.array([0.42, 0.47, 0.62], dtype=np.float32) * rng.uniform(0.97, 1.03, 3).astype(np.float32)
    gain = rng.uniform(0.85, 1.15)
    shade = (0.5 + 0.5 * height) * gain * (1 + 0.05 * _noise(rng, size, 14 * k))
    img = base * shade[..., None] + 0.035 * _noise(rng, size, (0.6 * k, 2.0 * k))[..., None]
    return img + rng.normal(0, 1.0 / 255, img.shape).astype(np.float32)


def _fabric_defect(rng: np.random.Generator, img: Array, kind: str) -> tuple[Array, Array]:
    size = img.shape[0]
    k = size / 128
    for _ in range(100):
        cx, cy = (rng.uniform(0.18, 0.82, 2) * size).tolist()
        centre = (cx, cy)
        if kind == "scratch":
            a = _scratch(rng, size, centre)
            bright = rng.random() < 0.5
            target = np.clip(img * 1.35 + 0.18, 0, 1) if bright else img * 0.5
            strength = rng.uniform(0.6, 0.85)
        elif kind == "hole":
            x, y = _grid(size)
            a = _coverage(_blob_dist(x, y, cx, cy, rng.uniform(5.0, 9.5) * k, rng))
            target = np.full_like(img, rng.uniform(0.04, 0.1))
            strength = 1.0
        elif kind == "stain":
            a = _stain(rng, size, centre, (8.0, 14.0))
            tint = np.array([1.05, 0.92, 0.62], dtype=np.float32) * rng.uniform(0.75, 0.9)
            target = img * tint
            strength = rng.uniform(0.75, 1.0)
        else:
            raise ValueError(f"unknown fabric defect {kind!r}")
        mask = a >= 0.5
        if _area_ok(mask):
            return _lerp(img, target, a * strength), mask
    raise RuntimeError(f"could not place a {kind} defect within the area bounds")  # pragma: no cover


# --------------------------------------------------------------------------- bracket
# Feature geometry in object units (pixels at 128 px image size): centre u, v and half sizes.
_PLATE = (0.0, 0.0, 40.0, 28.0, 8.0)
_HOLES = {"hole_left": (-30.0, 16.0), "hole_right": (30.0, 16.0)}
_HOLE_R = 5.5
_CONNECTOR = (0.0, -15.0, 9.0, 6.0)
_LABEL = (0.0, 10.0, 14.0, 7.0)


@dataclass
class _BracketState:
    """What to draw: features may be absent or shifted (the logical defects)."""

    missing: set[str] = field(default_factory=set)
    shift: dict[str, tuple[float, float]] = field(default_factory=dict)


class _Bracket:
    """One pose/lighting draw of the bracket; renders normal and logically defective variants."""

    def __init__(self, rng: np.random.Generator, size: int) -> None:
        self.size, self.k = size, size / 128
        x, y = _grid(size)
        self.scale = rng.uniform(0.975, 1.025) * self.k
        th = math.radians(rng.uniform(-3.5, 3.5))
        cx, cy = (size / 2 + rng.uniform(-3, 3, 2) * self.k).tolist()
        dx, dy = x - cx, y - cy
        self.u = (math.cos(th) * dx + math.sin(th) * dy) / self.scale
        self.v = (-math.sin(th) * dx + math.cos(th) * dy) / self.scale
        self.text = rng.uniform(8.0, 11.5, 2).tolist()  # half lengths of the two text lines
        self.gain = rng.uniform(0.9, 1.1)
        g = rng.uniform(-0.12, 0.12, 2).tolist()
        self.light = (1 + g[0] * (x / size - 0.5) + g[1] * (y / size - 0.5)) * self.gain
        self.belt = 0.2 + 0.025 * _noise(rng, size, 1.0 * self.k) + 0.015 * _noise(rng, size, 10 * self.k)
        self.brushed = 0.03 * _noise(rng, size, (0.4 * self.k, 6.0 * self.k))
        self.sheen = rng.uniform(-0.08, 0.08)
        self.sensor = rng.normal(0, 1.0 / 255, (size, size, 3)).astype(np.float32)

    def cover(self, dist: Array) -> Array:
        return _coverage(dist * self.scale)  # object units → pixels

    def footprint(self, name: str, shift: tuple[float, float] = (0.0, 0.0)) -> Array:
        """Opacity of one feature (for masks: where it is or should be)."""
        du, dv = shift
        if name in _HOLES:
            hu, hv = _HOLES[name]
            return self.cover(np.hypot(self.u - hu - du, self.v - hv - dv) - _HOLE_R - 1.0)
        cu, cv, hu, hv = _CONNECTOR if name == "connector" else _LABEL
        return self.cover(_box_dist(self.u, self.v, cu + du, cv + dv, hu, hv, 1.0))

    def render(self, state: _BracketState) -> Array:
        u, v = self.u, self.v
        sh = self.scale
        img = np.repeat(self.belt[..., None], 3, axis=2)
        plate_d = _box_dist(u, v, *_PLATE[:4], _PLATE[4])
        shadow = gaussian_filter(self.cover(_box_dist(u - 2, v - 2.5, *_PLATE[:4], _PLATE[4])), 2.0 * self.k)
        img = img * (1 - 0.45 * shadow)[..., None]
        metal = np.array([0.62, 0.64, 0.68], dtype=np.float32) * (1 + self.sheen * u / 40 + self.brushed)[..., None]
        img = _lerp(img, metal, self.cover(plate_d))
        for name, (hu, hv) in _HOLES.items():
            if name in state.missing:
                continue
            du, dv = state.shift.get(name, (0.0, 0.0))
            r = np.hypot(u - hu - du, v - hv - dv)
            img = _lerp(img, np.full_like(img, 0.78), self.cover(r - _HOLE_R - 1.0))  # chamfer rim
            img = _lerp(img, self.belt[..., None] * 0.55, self.cover(r - _HOLE_R))
        if "connector" not in state.missing:
            du, dv = state.shift.get("connector", (0.0, 0.0))
            cu, cv, hu, hv = _CONNECTOR
            img = _lerp(img, np.full_like(img, 0.11), self.cover(_box_dist(u, v, cu + du, cv + dv, hu, hv, 1.0)))
            gold = np.array([0.85, 0.7, 0.3], dtype=np.float32)
            for pu in (-5.0, 0.0, 5.0):
                pin = self.cover(_box_dist(u, v, cu + du + pu, cv + dv - 1.0, 1.2, 2.6))
                img = _lerp(img, gold, pin)
        if "label" not in state.missing:
            du, dv = state.shift.get("label", (0.0, 0.0))
            cu, cv, hu, hv = _LABEL
            paper = np.array([0.93, 0.92, 0.86], dtype=np.float32)
            img = _lerp(img, paper, self.cover(_box_dist(u, v, cu + du, cv + dv, hu, hv, 1.0)))
            for i, half in enumerate(self.text):
                bar = _box_dist(u, v, cu + du - hu + 3 + half, cv + dv - 2.6 + 5.2 * i, half, 0.8)
                img = _lerp(img, np.full_like(img, 0.15), _coverage(bar * sh, 1.2))
        return img * self.light[..., None] + self.sensor

    def on_plate(self, rng: np.random.Generator) -> tuple[float, float]:
        """A random image point on the plate, away from its edge."""
        pu, pv = rng.uniform(-30, 30), rng.uniform(-18, 18)
        i = np.unravel_index(np.argmin((self.u - pu) ** 2 + (self.v - pv) ** 2), self.u.shape)
        return float(i[1]) + 0.5, float(i[0]) + 0.5


def _bracket_sample(rng: np.random.Generator, size: int, kind: str | None) -> tuple[Array, Array | None]:
    part = _Bracket(rng, size)
    if kind is None:
        return part.render(_BracketState()), None
    for _ in range(100):
        if kind in ("scratch", "stain"):
            img = part.render(_BracketState())
            centre = part.on_plate(rng)
            if kind == "scratch":
                a = _scratch(rng, size, centre) * part.cover(_box_dist(part.u, part.v, 0, 0, 38, 26, 7))
                target = np.clip(img * 1.4 + 0.15, 0, 1) if rng.random() < 0.6 else img * 0.45
                strength = rng.uniform(0.65, 0.9)
            else:
                a = _stain(rng, size, centre, (7.0, 12.0))
                target = img * np.array([0.55, 0.5, 0.45], dtype=np.float32) * rng.uniform(0.8, 1.0)
                strength = rng.uniform(0.7, 0.95)
            mask = a >= 0.5
            defective = _lerp(img, target, a * strength)
        elif kind == "missing_part":
            name = str(rng.choice(["connector", "label", *_HOLES]))
            defective = part.render(_BracketState(missing={name}))
            mask = part.footprint(name) >= 0.5
        elif kind == "misplaced_part":
            name = str(rng.choice(["connector", "label"]))
            sign = float(rng.choice([-1.0, 1.0]))
            # Slide along the plate's long axis, staying on it and clear of the holes.
            dv = rng.uniform(-2.5, 2.5) if name == "connector" else -rng.uniform(0.0, 3.0)
            shift = (sign * rng.uniform(8.0, 12.0), dv)
            defective = part.render(_BracketState(shift={name: shift}))
            mask = (part.footprint(name) >= 0.5) | (part.footprint(name, shift) >= 0.5)
        else:
            raise ValueError(f"unknown bracket defect {kind!r}")
        if _area_ok(mask):
            return defective, mask
    raise RuntimeError(f"could not place a {kind} defect within the area bounds")  # pragma: no cover


def _fabric_sample(rng: np.random.Generator, size: int, kind: str | None) -> tuple[Array, Array | None]:
    img = _fabric(rng, size)
    return (img, None) if kind is None else _fabric_defect(rng, img, kind)


_RENDERERS: dict[str, Callable[[np.random.Generator, int, str | None], tuple[Array, Array | None]]] = {
    "fabric": _fabric_sample,
    "bracket": _bracket_sample,
}


# --------------------------------------------------------------------------- layout writer
_README = """# Synthetic industrial anomaly-detection data (tfanet)

Generated by `tfanet_core.data.synth.generate(seed={seed}, size={size})`; MVTec AD layout:
`<product>/train/good`, `<product>/test/<type>`, `<product>/ground_truth/<type>/<stem>_mask.png`
(0/255 PNG, pixel-exact). Same seed → byte-identical files. Free to use (MIT, like tfanet).

## Products
- **fabric** (texture): plain-weave cloth; weave phase, ±4° rotation, thread period, brightness,
  tint, fibre noise vary per image. Defects: `scratch` (pulled thread: thin bright or dark line),
  `hole` (dark irregular blob), `stain` (soft-edged brownish colour shift).
- **bracket** (object): brushed-metal plate with two mounting holes, a black connector with three
  gold pins and a paper label with two text lines, on a dark belt; pose (±3 px, ±3.5°, ±2.5 %
  scale), lighting and label text length vary. Defects: `scratch`, `stain` (oil), and the logical
  `missing_part` (connector, label or a hole absent; mask = where it should be) and
  `misplaced_part` (connector or label moved along the plate; mask = old ∪ new place).

Each defect covers 0.4–5 % of the image, at a random position.

## Counts per product
train/good {n_train}, test/good {n_test_good}, {n_defect} per defect type.
"""


def _prepare(out: Path, products: tuple[str, ...]) -> None:
    """Replace our own earlier output, refuse to overwrite anything else."""
    marker = out / _MARKER
    for p in products:
        d = out / p
        if d.exists() and any(d.iterdir()):
            if not marker.is_file():
                raise DataError(f"{d}: exists and was not written by tfanet synth; choose an empty --out folder")
            shutil.rmtree(d)


def generate(
    out: Path | str,
    seed: int = 0,
    size: int = 128,
    n_train: int = 40,
    n_test_good: int = 12,
    n_test_defect_per_type: int = 6,
) -> list[str]:
    """Write the synthetic dataset under ``out`` (MVTec AD layout) and return the product names.

    Each image has its own random stream derived from (seed, product, split, index), so the
    files do not depend on generation order or on the counts of the other splits.
    """
    if size < 64:
        raise ValueError(f"size must be >= 64 px (defects need room), got {size}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _prepare(out, PRODUCTS)
    params = dict(
        seed=seed, size=size, n_train=n_train, n_test_good=n_test_good, n_test_defect_per_type=n_test_defect_per_type
    )
    (out / _MARKER).write_text(json.dumps(params, sort_keys=True) + "\n")
    for pi, product in enumerate(PRODUCTS):
        render = _RENDERERS[product]
        jobs: list[tuple[str, str | None, int]] = [("train", None, n_train), ("test", None, n_test_good)]
        jobs += [("test", kind, n_test_defect_per_type) for kind in DEFECT_TYPES[product]]
        for ji, (split, kind, n) in enumerate(jobs):
            label = kind or "good"
            img_dir = out / product / split / label
            img_dir.mkdir(parents=True, exist_ok=True)
            if kind is not None:
                (out / product / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                rng = np.random.default_rng([seed, pi, ji, i])
                img, mask = render(rng, size, kind)
                _to_png(img, img_dir / f"{i:03d}.png")
                if mask is not None and kind is not None:  # only defect kinds have masks
                    _to_png(mask.astype(np.float32), out / product / "ground_truth" / kind / f"{i:03d}_mask.png")
    (out / "README.md").write_text(
        _README.format(seed=seed, size=size, n_train=n_train, n_test_good=n_test_good, n_defect=n_test_defect_per_type)
    )
    return list(PRODUCTS)


def main(argv: list[str] | None = None) -> None:
    """``python -m tfanet_core.data.synth --out DIR`` (the CLI's ``tfanet synth`` does the same)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=128)
    args = ap.parse_args(argv)
    print("\n".join(generate(args.out, seed=args.seed, size=args.size)))


if __name__ == "__main__":
    main()
