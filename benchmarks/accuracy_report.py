"""benchmarks/results/accuracy.md from the per-row JSON files of benchmarks/accuracy.py (nothing else is read).

The peers' figures are the ones measured earlier on the same data and quoted in issue #6; everything
else comes from the JSON rows, so the table can always be regenerated and audited.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Any

# (image AUROC, pixel AUROC, AUPRO); None where not measured. EfficientNet-Lite2 features, 256².
PEERS: dict[str, dict[str, tuple[float | None, float | None, float | None]]] = {
    "kolektorsdd": {
        "PatchCore-style kNN, earlier run (10 % coreset)": (0.875, 0.892, None),
        "anomalib 2.7 PatchCore": (0.860, 0.888, 0.481),
        "anomalib PaDiM": (0.853, 0.930, 0.607),
        "anomalib DFM": (0.877, 0.888, 0.426),
    },
    "magnetic_tile": {
        "PatchCore-style kNN, earlier run (10 % coreset)": (0.807, 0.769, None),
        "anomalib 2.7 PatchCore": (0.836, 0.773, 0.671),
        "anomalib PaDiM": (0.843, 0.732, 0.722),
        "anomalib DFM": (0.881, 0.801, 0.559),
    },
    "mvtec_loco/juice_bottle": {"PatchCore-style kNN, earlier run (10 % coreset)": (0.892, None, None)},
}
METHOD_NAMES = {"knn": "PatchCore-style kNN (this harness, 10 % coreset)", "mean": "mean reconstruction (no network)"}
SPRO_LIMIT = "0.05"  # the official MVTec LOCO headline integration limit


def load_rows(runs: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(runs.glob("*.json"))]


def _f(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _agg(values: list[float | None], digits: int = 3) -> str:
    """Mean, with ± half the range when there are several seeds."""
    vals = [v for v in values if v is not None]
    if not vals:
        return "–"
    if len(vals) == 1:
        return _f(vals[0], digits)
    return f"{mean(vals):.{digits}f} ± {(max(vals) - min(vals)) / 2:.{digits}f}"


def _delta(a: float | None, b: float | None) -> str:
    """Signed a − b, or a dash where either is missing."""
    return "–" if a is None or b is None else f"{a - b:+.3f}"


def _img_pix_pro(m: dict[str, Any]) -> str:
    return f"{_f(m['image_auroc'])} / {_f(m['pixel_auroc'])} / {_f(m['aupro'])}"


def _spro(metrics: dict[str, Any]) -> float | None:
    return (metrics.get("au_spro") or {}).get(SPRO_LIMIT)


def _of(rows: list[dict[str, Any]], group: str, category: str, method: str | None = None) -> list[dict[str, Any]]:
    """The rows of one group (and method) for one category."""
    return [r for r in rows if r["group"] == group and r["category"] == category and method in (None, r["method"])]


def _baseline_metrics(row: dict[str, Any]) -> dict[str, Any]:
    """A baseline row's headline metrics: its profile scoring where it was re-scored, else its only entry."""
    return row["metrics"].get("default") or next(iter(row["metrics"].values()))


def _load(rows: list[dict[str, Any]]) -> str:
    return "/".join(f"{max(r['loadavg_before'][0], r['loadavg_after'][0]):.1f}" for r in rows)


def main_table(rows: list[dict[str, Any]]) -> list[str]:
    out = [
        "| category | method | seeds | image AUROC | pixel AUROC | AUPRO | AU-sPRO@0.05 | train min | "
        "train img/s | load |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cat, peers in PEERS.items():
        for name, (img, pix, pro) in peers.items():
            out.append(f"| {cat} | {name} | 1 | {_f(img)} | {_f(pix)} | {_f(pro)} | – | – | – | – |")
        for method in ("knn", "mean"):
            for r in _of(rows, "baseline", cat, method):
                m = _baseline_metrics(r)
                out.append(
                    f"| {cat} | {METHOD_NAMES[method]} | 1 | {_f(m['image_auroc'])} | {_f(m['pixel_auroc'])} | "
                    f"{_f(m['aupro'])} | {_f(_spro(m))} | – | – | {_load([r])} |"
                )
        mine = _of(rows, "main", cat)
        if mine:
            ms = [r["metrics"]["default"] for r in mine]
            out.append(
                f"| {cat} | **TFA-Net `cpu` profile** | {len(mine)} | **{_agg([m['image_auroc'] for m in ms])}** | "
                f"**{_agg([m['pixel_auroc'] for m in ms])}** | {_agg([m['aupro'] for m in ms])} | "
                f"{_agg([_spro(m) for m in ms])} | {_agg([r['train_minutes'] for r in mine], 2)} | "
                f"{_agg([r['train_images_per_s'] for r in mine], 1)} | {_load(mine)} |"
            )
    return out


def gap_table(rows: list[dict[str, Any]]) -> list[str]:
    out = [
        "| category | best peer image AUROC | TFA-Net image | Δ | best peer pixel AUROC | TFA-Net pixel | Δ | "
        "mean-reconstruction image / pixel |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for cat in PEERS:
        mine = [r["metrics"]["default"] for r in _of(rows, "main", cat)]
        if not mine:
            continue
        ours_img = mean(m["image_auroc"] for m in mine)
        pix = [m["pixel_auroc"] for m in mine if m["pixel_auroc"] is not None]
        ours_pix = mean(pix) if pix else None
        best_img, best_pix = best_peer(rows, cat)
        floors = _of(rows, "baseline", cat, "mean")
        fm = _baseline_metrics(floors[0]) if floors else {}
        out.append(
            f"| {cat} | {_f(best_img)} | {_f(ours_img)} | {_delta(ours_img, best_img)} | {_f(best_pix)} | "
            f"{_f(ours_pix)} | {_delta(ours_pix, best_pix)} | "
            f"{_f(fm.get('image_auroc'))} / {_f(fm.get('pixel_auroc'))} |"
        )
    return out


def candidate_table(rows: list[dict[str, Any]]) -> list[str]:
    """Alternatives to the profile run under the main rows' protocol, with their difference to the profile."""
    cands: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r["group"] == "candidate":
            cands[(r["variant"], r["category"])].append(r)
    if not cands:
        return ["(no candidates run)"]
    out = [
        "| candidate | category | seeds | image AUROC | pixel AUROC | AUPRO | AU-sPRO@0.05 | Δ image / pixel / AUPRO "
        "against `cpu` | kept epochs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def means(rs: list[dict[str, Any]], key: str) -> float | None:
        values = [r["metrics"]["default"][key] for r in rs]
        return mean(values) if values and None not in values else None

    for (variant, cat), mine in cands.items():
        cpu = _of(rows, "main", cat)
        ms = [r["metrics"]["default"] for r in mine]
        deltas = " / ".join(_delta(means(mine, k), means(cpu, k)) for k in ("image_auroc", "pixel_auroc", "aupro"))
        out.append(
            f"| {variant} | {cat} | {len(mine)} | {_agg([m['image_auroc'] for m in ms])} | "
            f"{_agg([m['pixel_auroc'] for m in ms])} | {_agg([m['aupro'] for m in ms])} | "
            f"{_agg([_spro(m) for m in ms])} | {deltas} | {', '.join(str(r['best_epoch']) for r in mine)} |"
        )
    return out


def scoring_table(rows: list[dict[str, Any]]) -> list[str]:
    """Every re-scoring of the main rows' models: per category the mean over seeds, then the mean over categories."""
    mine = [r for r in rows if r["group"] == "main"]
    if not mine:
        return ["(no final-profile rows yet)"]
    cats = list(dict.fromkeys(r["category"] for r in mine))
    out = [
        "| map + image score | " + " | ".join(f"{c} img / pix" for c in cats) + " | mean img / pix |",
        "|---|" + "---|" * (len(cats) + 1),
    ]
    for variant in (v for v in mine[0]["metrics"] if v != "default"):
        per_cat = []
        for cat in cats:
            ms = [r["metrics"][variant] for r in mine if r["category"] == cat and variant in r["metrics"]]
            per_cat.append((mean(m["image_auroc"] for m in ms), mean(m["pixel_auroc"] for m in ms)))
        cells = [f"{_f(img)} / {_f(pix)}" for img, pix in per_cat]
        total = f"{_f(mean(c[0] for c in per_cat))} / {_f(mean(c[1] for c in per_cat))}"
        out.append(f"| {variant} | " + " | ".join(cells) + f" | {total} |")
    return out


def by_type_table(rows: list[dict[str, Any]]) -> list[str]:
    """Pixel AUROC per defect type at map scale 1 and on the pyramid, TFA-Net beside the network-free floor.

    One table per category that has several defect types (only those rows carry the per-type figures).
    """
    out: list[str] = []
    for cat in PEERS:
        methods = {
            "TFA-Net `cpu`": _of(rows, "main", cat),
            "mean reconstruction (no network)": _of(rows, "baseline", cat, "mean"),
        }
        body, types = [], []
        for label, mine in methods.items():
            for variant, scales in (("product+std, scales 1", "1"), ("product+std, scales 1,2,4,8", "1, 2, 4, 8")):
                ms = [r["metrics"][variant] for r in mine if "pixel_auroc_by_type" in r["metrics"].get(variant, {})]
                if not ms:
                    continue
                types = types or list(ms[0]["pixel_auroc_by_type"])
                cells = " | ".join(_f(mean(m["pixel_auroc_by_type"][t] for m in ms)) for t in types)
                body.append(f"| {label} | {scales} | {len(ms)} | {cells} | {_f(mean(m['pixel_auroc'] for m in ms))} |")
        if body:
            out += [
                f"{cat}:\n",
                "| method | map scales | seeds | " + " | ".join(types) + " | all types pooled |",
                "|---|---|---|" + "---|" * (len(types) + 1),
                *body,
                "",
            ]
    return out or ["(no category with several defect types has rows yet)"]


def ablation_table(rows: list[dict[str, Any]]) -> list[str]:
    base = {r["category"]: r for r in rows if r["group"] == "ablation" and r["variant"] == "base"}
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r["group"] not in ("main", "baseline", "ablation", "fader", "fader_sweep", *ROUND2_GROUPS):
            groups[r["group"]].append(r)
    cats = sorted(base)
    out = [
        "| ablation | variant | " + " | ".join(f"{c} img / pix / AUPRO" for c in cats) + " | mean Δ img | mean Δ pix | "
        "train min (each) | load |",
        "|---|---|" + "---|" * len(cats) + "---|---|---|---|",
    ]

    def cells(by_cat: dict[str, dict[str, Any]]) -> list[str]:
        res = []
        for c in cats:
            r = by_cat.get(c)
            if r is None:
                res.append("not run")
                continue
            res.append(_img_pix_pro(r["metrics"]["default"]))
        return res

    def deltas(by_cat: dict[str, dict[str, Any]], key: str) -> str:
        ds = [
            by_cat[c]["metrics"]["default"][key] - base[c]["metrics"]["default"][key]
            for c in cats
            if c in by_cat
            and by_cat[c]["metrics"]["default"][key] is not None
            and base[c]["metrics"]["default"][key] is not None
        ]
        return f"{mean(ds):+.3f}" if ds else "–"

    def minutes(by_cat: dict[str, dict[str, Any]]) -> str:
        return "/".join(_f(by_cat[c].get("train_minutes"), 1) if c in by_cat else "–" for c in cats)

    out.append(
        "| (base) | first `cpu` profile (10 epochs, val loss) | " + " | ".join(cells(base)) + " | 0 | 0 | "
        f"{minutes(base)} | {_load(list(base.values()))} |"
    )
    for group, members in groups.items():
        variants: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
        for r in members:
            variants[r["variant"]][r["category"]] = r
        for variant, by_cat in variants.items():
            out.append(
                f"| {group} | {variant} | " + " | ".join(cells(by_cat)) + f" | {deltas(by_cat, 'image_auroc')} | "
                f"{deltas(by_cat, 'pixel_auroc')} | {minutes(by_cat)} | {_load(list(by_cat.values()))} |"
            )
    return out


ROUND2_GROUPS = ("geometry", "bank", "baseline_native", "auto")
CATEGORIES = tuple(PEERS)


def best_peer(rows: list[dict[str, Any]], category: str) -> tuple[float | None, float | None]:
    """The best image and pixel AUROC among the quoted peers and this harness's square kNN row."""
    knn = [_baseline_metrics(r) for r in _of(rows, "baseline", category, "knn")]
    values = [*PEERS[category].values(), *((m["image_auroc"], m["pixel_auroc"], m["aupro"]) for m in knn)]
    image = max((v[0] for v in values if v[0] is not None), default=None)
    pixel = max((v[1] for v in values if v[1] is not None), default=None)
    return image, pixel


def round2_table(rows: list[dict[str, Any]]) -> list[str]:
    """Issue #21: geometry, template bank, and the network-free methods at the native geometry, per category.

    Each cell is image / pixel AUROC (mean ± half-range over seeds where there are several); the last two
    columns are the mean over the three categories of the difference to the best peer.
    """
    head = " | ".join(f"{c} img / pix" for c in CATEGORIES)
    out = [f"| group | variant | {head} | Δ img vs best peer | Δ pix vs best peer | train min |", "|---|---|"]
    out[1] += "---|" * (len(CATEGORIES) + 3)
    peers = {c: best_peer(rows, c) for c in CATEGORIES}
    out.append(
        "| peers | best peer | "
        + " | ".join(f"{_f(peers[c][0])} / {_f(peers[c][1])}" for c in CATEGORIES)
        + " | – | – | – |"
    )
    variants: dict[tuple[str, str], dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["group"] in ROUND2_GROUPS or (r["group"] == "main" and r["dataset"] == "real"):
            variants[(r["group"], r["variant"])][r["category"]].append(r)
    order = [*ROUND2_GROUPS, "main"]
    for (group, variant), by_cat in sorted(variants.items(), key=lambda item: order.index(item[0][0])):
        cells, d_img, d_pix, minutes = [], [], [], []
        for c in CATEGORIES:
            ms = [_baseline_metrics(r) for r in by_cat.get(c, [])]
            if not ms:
                cells.append("–")
                continue
            img = mean(m["image_auroc"] for m in ms)
            pix_values = [m["pixel_auroc"] for m in ms if m["pixel_auroc"] is not None]
            shapes = {"×".join(map(str, r["geometry"])) for r in by_cat[c] if r.get("geometry")}
            shape = f" ({shapes.pop()})" if len(shapes) == 1 and group != "baseline_native" else ""
            cells.append(f"{_agg([m['image_auroc'] for m in ms])} / {_agg(pix_values)}{shape}")
            if peers[c][0] is not None:
                d_img.append(img - peers[c][0])
            if peers[c][1] is not None and pix_values:
                d_pix.append(mean(pix_values) - peers[c][1])
            minutes += [r["train_minutes"] for r in by_cat[c] if r.get("train_minutes") is not None]
        complete = len(d_img) == len(CATEGORIES)
        name = "**TFA-Net `cpu` profile**" if group == "main" else variant
        out.append(
            f"| {group} | {name} | "
            + " | ".join(cells)
            + f" | {f'{mean(d_img):+.3f}' if complete else '–'} | {f'{mean(d_pix):+.3f}' if d_pix else '–'} | "
            + f"{_agg(minutes, 1) if minutes else '–'} |"
        )
    return out


def fader_sweep_table(rows: list[dict[str, Any]]) -> list[str]:
    """FADeR's threshold × temperature on one trained model per category, beside 'off'; and what its mask does."""
    sweep = [r for r in rows if r["group"] == "fader_sweep"]
    if not sweep:
        return ["(not run yet)"]
    names = [k for k in sweep[0]["metrics"] if k.startswith("fader ")]
    out = [
        "| setting | " + " | ".join(f"{r['category']} img / pix" for r in sweep) + " | mask on defect tokens | "
        "mask on other tokens |",
        "|---|" + "---|" * (len(sweep) + 2),
    ]
    for name in ["fader_off", *names]:
        cells = [f"{_f(r['metrics'][name]['image_auroc'])} / {_f(r['metrics'][name]['pixel_auroc'])}" for r in sweep]
        masks = [r.get("fader_masks", {}).get(name.removeprefix("fader "), {}) for r in sweep]
        defect = [m["defect_tokens"] for m in masks if "defect_tokens" in m]
        normal = [m["normal_tokens"] for m in masks if "normal_tokens" in m]
        label = "off" if name == "fader_off" else name.removeprefix("fader ")
        out.append(
            f"| {label} | "
            + " | ".join(cells)
            + f" | {_f(mean(defect)) if defect else '–'} | {_f(mean(normal)) if normal else '–'} |"
        )
    return out


def fader_table(rows: list[dict[str, Any]]) -> list[str]:
    fader = [r for r in rows if r["group"] == "fader"]
    if not fader:
        return ["(not run yet)"]
    out = [
        "| data | category | profile | seed | FADeR off img / pix / AUPRO | FADeR on img / pix / AUPRO | Δ img "
        "| Δ pix |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in fader:
        on, off = r["metrics"]["default"], r["metrics"]["fader_off"]
        out.append(
            f"| {r['dataset']} | {r['category']} | {r['profile']} | {r['seed']} | {_img_pix_pro(off)} | "
            f"{_img_pix_pro(on)} | {_delta(on['image_auroc'], off['image_auroc'])} | "
            f"{_delta(on['pixel_auroc'], off['pixel_auroc'])} |"
        )
    return out


def synth_baseline_table(rows: list[dict[str, Any]]) -> list[str]:
    synth = [r for r in rows if r["group"] == "baseline" and r["dataset"] == "synth"]
    out = ["| category | method | image AUROC | pixel AUROC | AUPRO |", "|---|---|---|---|---|"]
    for r in synth:
        m = next(iter(r["metrics"].values()))
        out.append(
            f"| {r['category']} | {METHOD_NAMES[r['method']]} ({r['profile']} features) | {_f(m['image_auroc'])} | "
            f"{_f(m['pixel_auroc'])} | {_f(m['aupro'])} |"
        )
    return out


def write_report(runs: Path, out: Path, notes: Path | None = None) -> str:
    """Render the tables; the prose around them (how to read them, conclusions) lives in accuracy_notes.md."""
    rows = load_rows(runs)
    notes = notes or runs.parent / "accuracy_notes.md"
    prose = notes.read_text() if notes.is_file() else ""
    parts = prose.split("<!-- tables -->")
    head, tail = parts[0], (parts[1] if len(parts) > 1 else "")
    text = "\n".join(
        [
            head.rstrip() + "\n" if head.strip() else "# Accuracy on the real dev data\n",
            "## Main table: the `cpu` profile beside the peers and the baselines\n",
            *main_table(rows),
            "\n### Gap to the best peer (positive = TFA-Net better)\n",
            *gap_table(rows),
            "\n## Round 2 (issue #21): input geometry, template bank, and the network-free methods at the native "
            "geometry (seed 0 unless a ± shows several)\n",
            *round2_table(rows),
            "\n### FADeR swept (issue #21): one trained model per category (native geometry, 10 epochs, val-loss "
            "selection), its mask's threshold and temperature varied; mask means over test tokens\n",
            *fader_sweep_table(rows),
            "\n### Candidates: alternatives run like the main rows (full schedule, the same seeds)\n",
            *candidate_table(rows),
            "\n## Scoring ablation (the main rows' trained models re-scored; mean over their seeds)\n",
            *scoring_table(rows),
            "\n### Pixel AUROC by defect type (each type's images against the good ones)\n",
            *by_type_table(rows),
            "\n## Training ablations (seed 0; each against the ablation base = the first `cpu` profile, 10 epochs with "
            "val-loss selection; Δ = mean over the three categories)\n",
            *ablation_table(rows),
            "\n## FADeR ablation (issue #11): the same trained TFA-Net with the attenuator off and on\n",
            *fader_table(rows),
            "\n## Synthetic data: the network-free floor\n",
            *synth_baseline_table(rows),
            "",
            tail.strip() + "\n" if tail.strip() else "",
        ]
    )
    out.write_text(text)
    return text
