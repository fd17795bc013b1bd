"""The dataset gate: a great-expectations 1.x suite over the manifest, before anything trains.

GX checks columns, not files, so the file-level facts are measured first and added as columns
(:func:`manifest_frame`): can the image be decoded completely (``tfanet_core.data.images``, the
same reader training uses), do its bytes, size and mode still match what the manifest
declares, are its masks present, readable and of the image's size, in how many splits do
its bytes appear. The suite then states the rules over those columns, and a second, tiny
one the per-split minimum counts. Why GX for this: the Data Docs HTML is a report a quality
engineer can open and keep with the dataset version, and the rules are declared, not buried
in if-statements.

A failed suite raises :class:`ValidationFailed` whose message lists every problem with the
offending paths (all of them, in one go — fixing a dataset one error per run is how people
learn to hate a tool). Duplicates *within* a split are a warning by default (real datasets
have them, and they leak nothing); the same bytes in two splits is always an error (leakage).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from tfanet_core.config import section_from_mapping
from tfanet_core.data.images import DataError, open_image, open_mask_image
from tfanet_core.data.layouts import GOOD, SPLITS
from tfanet_core.data.manifest import Manifest
from tfanet_core.errors import ConfigError

__all__ = ["Problem", "ValidationFailed", "ValidationReport", "ValidationRules", "manifest_frame", "validate_manifest"]

log = logging.getLogger(__name__)

COUNT_GROUPS = ("train", "val", "test", "test_good", "test_defect")
_SHOW = 25  # offending rows listed per problem in the message (all of them are in the report and Data Docs)


@dataclass(frozen=True)
class ValidationRules:
    """What a valid dataset version looks like; from the ``validate:`` section of params.yaml.

    ``allowed_labels``/``allowed_modes``/``image_size`` are checked only when given.
    ``require_masks`` None means: required for every defect image when the dataset has masks
    at all (a dataset without any ground truth is legal, its pixel metrics are just undefined).
    """

    allowed_labels: tuple[str, ...] | None = None
    allowed_modes: tuple[str, ...] | None = None
    image_size: tuple[int, int] | None = None  # (width, height)
    min_counts: Mapping[str, int] = field(default_factory=lambda: {"train": 1, "val": 1, "test": 1})
    require_masks: bool | None = None
    duplicates_within_split: str = "warning"  # or "error"

    def __post_init__(self) -> None:
        unknown = set(self.min_counts) - set(COUNT_GROUPS)
        if unknown:
            raise ConfigError(f"min_counts keys must be among {COUNT_GROUPS}, got {sorted(unknown)}")
        if self.duplicates_within_split not in ("warning", "error"):
            raise ConfigError(
                f"duplicates_within_split must be 'warning' or 'error', not {self.duplicates_within_split!r}"
            )

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> ValidationRules:
        rules = section_from_mapping(cls, params, "params.yaml 'validate'")
        as_tuples: dict[str, Any] = {
            k: tuple(v) for k in ("allowed_labels", "allowed_modes", "image_size") if (v := getattr(rules, k))
        }
        return replace(rules, **as_tuples)


@dataclass(frozen=True)
class Problem:
    check: str  # short id, e.g. "readable", "leakage"
    severity: str  # "error" | "warning"
    description: str
    rows: tuple[tuple[str, str], ...]  # (path or group, what is wrong with it)


@dataclass
class ValidationReport:
    success: bool
    dataset: str
    manifest_version: str
    n_images: int
    evaluated: int
    problems: list[Problem]
    docs_index: Path | None

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    def summary(self) -> str:
        head = (
            f"dataset {self.dataset} (manifest {self.manifest_version[:12]}, {self.n_images} images): "
            f"{len(self.errors)} of {self.evaluated} checks failed, {len(self.warnings)} warning(s)"
        )
        lines = [head + (f"; Data Docs: {self.docs_index}" if self.docs_index else "")]
        for p in self.errors + self.warnings:
            lines.append(f"  [{p.severity} {p.check}] {p.description} ({len(p.rows)}):")
            lines += [f"      {where}: {why}" if why else f"      {where}" for where, why in p.rows[:_SHOW]]
            if len(p.rows) > _SHOW:
                lines.append(f"      ... and {len(p.rows) - _SHOW} more (see the Data Docs)")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["docs_index"] = str(self.docs_index) if self.docs_index else None
        return d


class ValidationFailed(DataError):
    """The dataset failed the suite; ``report`` holds every problem, the message lists them with paths."""

    def __init__(self, report: ValidationReport) -> None:
        self.report = report
        super().__init__(report.summary() + "\nFix or remove these files, rebuild the manifest, and run again.")


# --------------------------------------------------------------------------- file-level facts as columns
def _reason(exc: Exception, path: Path) -> str:
    return str(exc).removeprefix(f"{path}: ")


def _image_facts(path: Path) -> dict[str, Any]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        return {"readable": False, "read_error": f"cannot read ({exc.strerror})"}
    facts: dict[str, Any] = {"actual_sha256": hashlib.sha256(data).hexdigest()}
    try:
        img = open_image(path, data)
    except DataError as exc:
        return facts | {"readable": False, "read_error": _reason(exc, path)}
    return facts | {
        "readable": True,
        "read_error": "",
        "actual_width": img.size[0],
        "actual_height": img.size[1],
        "actual_mode": img.mode,
    }


def _mask_facts(row: Mapping[str, Any], root: Path, size: tuple[int, int] | None, required: bool) -> dict[str, Any]:
    problems, hashes = [], []
    if required and row["label"] != GOOD and not row["mask_paths"]:
        problems.append("defect image without a mask")
    for rel in row["mask_paths"]:
        path = root / rel
        try:
            data = path.read_bytes()
            mask = open_mask_image(path, data)
        except FileNotFoundError:
            problems.append(f"mask {rel} is missing")
            continue
        except OSError as exc:
            problems.append(f"mask {rel}: cannot read ({exc.strerror})")
            continue
        except DataError as exc:
            problems.append(f"mask {rel}: {_reason(exc, path)}")
            continue
        hashes.append(hashlib.sha256(data).hexdigest())
        if size is not None and mask.size != size:
            problems.append(f"mask {rel} is {mask.size[0]}x{mask.size[1]}, its image {size[0]}x{size[1]}")
    return {
        "n_masks": len(row["mask_paths"]),
        "masks_ok": not problems,
        "mask_problem": "; ".join(problems),
        "actual_mask_sha256": ";".join(hashes) if len(hashes) == len(row["mask_paths"]) else None,
    }


def manifest_frame(
    manifest: Manifest, root: Path | str | None = None, *, require_masks: bool | None = None, progress: bool = True
) -> pd.DataFrame:
    """The manifest as a DataFrame (list columns ``;``-joined, as in its CSV) plus the measured file facts."""
    base = Path(root) if root is not None else manifest.root
    if base is None:
        raise ValueError("the manifest has no root: pass root= (the dataset folder its paths are relative to)")
    df = pd.DataFrame([asdict(r) for r in manifest.rows])
    if df.empty:
        raise DataError(f"{base}: the manifest has no rows; is the dataset folder empty?")
    required = any(df["mask_paths"].map(bool)) if require_masks is None else require_masks
    facts = []
    for row in tqdm(df.to_dict("records"), desc="checking files", unit="img", disable=not progress, leave=False):
        image = _image_facts(base / row["path"])
        size = (image["actual_width"], image["actual_height"]) if image["readable"] else (row["width"], row["height"])
        facts.append(image | _mask_facts(row, base, size, required))
    df = pd.concat([df, pd.DataFrame(facts, index=df.index)], axis=1)
    for col in ("mask_paths", "mask_sha256"):
        df[col] = df[col].map(";".join)
    for col in ("actual_width", "actual_height"):
        if col not in df:
            df[col] = pd.NA
        df[col] = df[col].astype("Int64")
    for col in ("actual_sha256", "actual_mode"):
        if col not in df:
            df[col] = None
    df["n_splits_of_sha256"] = df.groupby("sha256")["split"].transform("nunique")
    return df


def _count_frame(df: pd.DataFrame, minimums: Mapping[str, int]) -> pd.DataFrame:
    groups = {
        **{s: df["split"] == s for s in SPLITS},
        "test_good": (df["split"] == "test") & (df["label"] == GOOD),
        "test_defect": (df["split"] == "test") & (df["label"] != GOOD),
    }
    return pd.DataFrame(
        [{"group": g, "n_images": int(groups[g].sum()), "minimum": int(m)} for g, m in minimums.items()]
    )


# --------------------------------------------------------------------------- the suite
Detail = Callable[[pd.Series], str] | None  # explains one failing row in words


def _manifest_checks(rules: ValidationRules) -> list[tuple[str, Any, Detail]]:
    """(check id, expectation, detail) in report order; the detail explains a failing row."""
    import great_expectations.expectations as gxe
    from great_expectations.expectations.metadata_types import FailureSeverity
    from great_expectations.expectations.row_conditions import Column

    def pair(a: str, b: str, description: str) -> Any:
        # Rows whose file could not be read have no actual_* values: "readable" reports those once.
        return gxe.ExpectColumnPairValuesToBeEqual(
            column_A=a, column_B=b, ignore_row_if="either_value_is_missing", description=description
        )

    in_set, between = gxe.ExpectColumnValuesToBeInSet, gxe.ExpectColumnValuesToBeBetween
    checks: list[tuple[str, Any, Detail]] = [
        (f"not_null:{c}", gxe.ExpectColumnValuesToNotBeNull(column=c, description=f"every row has a {c}"), None)
        for c in ("path", "sha256", "split", "label", "width", "height", "mode")
    ]
    checks += [
        ("unique_path", gxe.ExpectColumnValuesToBeUnique(column="path", description="each file is listed once"), None),
        (
            "sha256_format",
            gxe.ExpectColumnValuesToMatchRegex(column="sha256", regex=r"^[0-9a-f]{64}$", description="sha256 is hex"),
            lambda r: f"{r.sha256!r} is not a sha256",
        ),
        (
            "split",
            in_set(column="split", value_set=list(SPLITS), description="split is train, val or test"),
            lambda r: f"split {r.split!r}",
        ),
        (
            "train_val_good",
            in_set(
                column="label",
                value_set=[GOOD],
                row_condition=Column("split") != "test",
                description="train and val images are all good (normal)",
            ),
            lambda r: f"label {r.label!r} in split {r.split}",
        ),
        (
            "readable",
            in_set(column="readable", value_set=[True], description="every image decodes completely as 8-bit"),
            lambda r: r.read_error,
        ),
        (
            "unchanged",
            pair("sha256", "actual_sha256", "file bytes unchanged since the manifest was built"),
            lambda r: f"sha256 is now {r.actual_sha256[:12]}…, the manifest says {r.sha256[:12]}…",
        ),
        (
            "width",
            pair("width", "actual_width", "width as declared in the manifest"),
            lambda r: f"{r.actual_width} px wide, the manifest says {r.width}",
        ),
        (
            "height",
            pair("height", "actual_height", "height as declared in the manifest"),
            lambda r: f"{r.actual_height} px high, the manifest says {r.height}",
        ),
        (
            "mode",
            pair("mode", "actual_mode", "image mode as declared in the manifest"),
            lambda r: f"mode {r.actual_mode}, the manifest says {r.mode}",
        ),
        (
            "masks",
            in_set(
                column="masks_ok",
                value_set=[True],
                description="every defect image has its mask(s), readable and of the image's size",
            ),
            lambda r: r.mask_problem,
        ),
        (
            "masks_unchanged",
            pair("mask_sha256", "actual_mask_sha256", "mask bytes unchanged since the manifest was built"),
            lambda r: f"mask(s) {r.mask_paths} changed",
        ),
        (
            "leakage",
            between(
                column="n_splits_of_sha256",
                min_value=1,
                max_value=1,
                description="no image is in two splits (the same bytes in two splits is leakage)",
            ),
            lambda r: r.duplicate_of,
        ),
        (
            "duplicates",
            gxe.ExpectCompoundColumnsToBeUnique(
                column_list=["split", "sha256"],
                severity=FailureSeverity.CRITICAL
                if rules.duplicates_within_split == "error"
                else FailureSeverity.WARNING,
                description="no two files of one split have identical bytes",
            ),
            lambda r: r.duplicate_of,
        ),
    ]
    if rules.allowed_labels is not None:
        allowed = list(rules.allowed_labels)
        checks.append(
            (
                "labels",
                in_set(column="label", value_set=allowed, description=f"labels are among {allowed}"),
                lambda r: f"label {r.label!r}",
            )
        )
    if rules.allowed_modes is not None:
        modes = list(rules.allowed_modes)
        checks.append(
            (
                "modes",
                in_set(column="mode", value_set=modes, description=f"image modes are among {modes}"),
                lambda r: f"mode {r.mode}",
            )
        )
    if rules.image_size is not None:
        w, h = rules.image_size
        checks += [
            (
                "image_width",
                between(column="width", min_value=w, max_value=w, description=f"images are {w} px wide"),
                lambda r: f"{r.width} px wide",
            ),
            (
                "image_height",
                between(column="height", min_value=h, max_value=h, description=f"images are {h} px high"),
                lambda r: f"{r.height} px high",
            ),
        ]
    return checks


def _duplicate_of(df: pd.DataFrame) -> pd.Series:
    """For each row, the other files with the same bytes and their splits (the detail the report shows)."""
    groups = df.groupby("sha256")
    others = {}
    for _, g in groups:
        if len(g) > 1:
            for idx in g.index:
                others[idx] = ", ".join(
                    f"same bytes as {p} ({s})"
                    for i, p, s in zip(g.index, g["path"], g["split"], strict=True)
                    if i != idx
                )
    return pd.Series([others.get(i, "") for i in df.index], index=df.index, dtype="object")


def _run_suite(
    ctx: Any, name: str, frame: pd.DataFrame, expectations: Sequence[tuple[str, Any, Detail]], site: str | None
) -> list[tuple[str, Detail, Any]]:
    """Validate ``frame`` as its own asset and suite; (check id, detail, result) per expectation."""
    import great_expectations as gx

    details = {}
    suite = gx.ExpectationSuite(name=f"tfanet_{name}")
    for check, expectation, detail in expectations:
        expectation.meta = {"check": check}  # how a result finds its way back to our check id
        details[check] = detail
        suite.add_expectation(expectation)
    suite = ctx.suites.add(suite)
    batch = (
        ctx.data_sources.add_pandas(f"{name}_source")
        .add_dataframe_asset(name)
        .add_batch_definition_whole_dataframe("all")
    )
    vd = ctx.validation_definitions.add(gx.ValidationDefinition(name=f"{name}_validation", data=batch, suite=suite))
    actions: list[gx.checkpoint.ValidationAction] = (
        [gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=[site])] if site else []
    )
    checkpoint = ctx.checkpoints.add(
        gx.Checkpoint(name=f"{name}_checkpoint", validation_definitions=[vd], actions=actions, result_format="COMPLETE")
    )
    (run,) = checkpoint.run(batch_parameters={"dataframe": frame}).run_results.values()
    checks = [r.expectation_config.meta["check"] for r in run.results]
    return [(check, details[check], r) for check, r in zip(checks, run.results, strict=True)]


def _problem(check: str, result: Any, frame: pd.DataFrame, detail: Detail, key: str) -> Problem:
    severity = "warning" if str(result.expectation_config.severity).lower().endswith("warning") else "error"
    rows = [
        (str(frame.loc[i, key]), detail(frame.loc[i]) if detail else "")
        for i in result.result.get("unexpected_index_list") or []
    ]
    if not rows and (result.exception_info or {}).get("raised_exception"):
        rows.append(("(suite)", str(result.exception_info.get("exception_message"))))
    return Problem(
        check, severity, result.expectation_config.description or result.expectation_config.type, tuple(rows)
    )


def _count_checks() -> list[tuple[str, Any, Detail]]:
    import great_expectations.expectations as gxe

    at_least = gxe.ExpectColumnPairValuesAToBeGreaterThanB(
        column_A="n_images",
        column_B="minimum",
        or_equal=True,
        description="every split has at least its minimum number of images",
    )
    return [("split_counts", at_least, lambda r: f"{r.n_images} image(s), minimum {r.minimum}")]


def _docs_site(ctx: Any, docs_dir: Path) -> str:
    """A Data Docs site writing into ``docs_dir`` (an ephemeral context's default site is a random temp dir)."""
    ctx.add_data_docs_site(
        site_name="tfanet",
        site_config={
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        },
    )
    return "tfanet"


def validate_manifest(
    manifest: Manifest,
    root: Path | str | None = None,
    *,
    rules: ValidationRules | None = None,
    docs_dir: Path | str | None = None,
    raise_on_failure: bool = True,
    progress: bool = True,
) -> ValidationReport:
    """Check every file of ``manifest`` and run the suite; write Data Docs and validation.json to ``docs_dir``.

    Raises :class:`ValidationFailed` when an error-severity check fails (unless
    ``raise_on_failure`` is False); warnings are logged and kept in the report.
    """
    logging.getLogger("great_expectations").setLevel(logging.WARNING)  # its INFO lines drown the report
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    rules = rules or ValidationRules()
    frame = manifest_frame(manifest, root, require_masks=rules.require_masks, progress=progress)
    frame["duplicate_of"] = _duplicate_of(frame)
    counts = _count_frame(frame, rules.min_counts)

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    site = None
    if docs_dir is not None:
        docs_dir = Path(docs_dir).resolve()
        docs_dir.mkdir(parents=True, exist_ok=True)
        site = _docs_site(ctx, docs_dir)
    outcomes = [(frame, "path", r) for r in _run_suite(ctx, "manifest", frame, _manifest_checks(rules), site)]
    outcomes += [(counts, "group", r) for r in _run_suite(ctx, "split_counts", counts, _count_checks(), site)]
    problems = [
        _problem(check, result, table, detail, key)
        for table, key, (check, detail, result) in outcomes
        if not result.success
    ]
    report = ValidationReport(
        success=not any(p.severity == "error" for p in problems),
        dataset=",".join(sorted(frame["category"].unique())),
        manifest_version=manifest.version,
        n_images=len(frame),
        evaluated=len(outcomes),
        problems=problems,
        docs_index=docs_dir / "index.html" if docs_dir is not None else None,
    )
    if docs_dir is not None:
        (docs_dir / "validation.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    for p in report.warnings:
        log.warning("%s: %s (%d)", p.check, p.description, len(p.rows))
    if not report.success and raise_on_failure:
        raise ValidationFailed(report)
    log.info(
        "dataset %s: validation passed (%d checks, %d warnings)", report.dataset, report.evaluated, len(report.warnings)
    )
    return report
