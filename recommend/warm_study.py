"""``recommend study --warm 20,50,200``: the same comparison on warm-N variants (001 Table 3).

Each variant ``DATASET-warmN`` is prepared from the base dataset's own raw files and
options (its manifest records them) with ``--min-item-interactions N``, then studied
exactly as the base would be (:func:`recommend.study.run_study`, which resumes and
skips finished runs); one report puts the variants side by side: rows = the study's
configurations, columns = HR@10 / NDCG@10 per variant, as Table 3 does.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from data.dataset import PreparedDataset
from data.prepare import prepare_dataset
from extract.names import store_spelling
from featurestore.errors import UserError
from featurestore.runtime.files import write_atomic
from featurestore.workspace import Workspace
from recommend.study import REPORT, SUMMARY, StudyOptions, run_study

_KEPT_OPTIONS = ("max_seq_len", "min_interactions", "users", "seed", "text_fields")


def warm_name(dataset: str, n: int) -> str:
    return f"{dataset}-warm{n}"


def ensure_warm(ws: Workspace, base: PreparedDataset, n: int) -> PreparedDataset:
    """The warm-N variant of ``base``, prepared from its raw files unless it already is (same options)."""
    name = warm_name(base.name, n)
    options = {k: base.manifest["options"].get(k) for k in _KEPT_OPTIONS}
    folder = ws.dataset_dir(name)
    if (folder / "manifest.json").exists():
        existing = PreparedDataset.load(folder)
        wanted = {**options, "min_item_interactions": n}
        if all(existing.manifest["options"].get(k) == v for k, v in wanted.items()):
            return existing
    source = Path(base.manifest.get("source", ""))
    if not source.is_dir():
        raise UserError(f"--warm prepares {name} from the raw files of {base.name}, but its source {source} is "
                        f"gone; prepare it yourself (`featurestore dataset prepare ... --name {name} "
                        f"--min-item-interactions {n}`)")
    prepare_dataset(base.manifest["format"], source, folder, name=name, min_item_interactions=n, **options)
    return PreparedDataset.load(folder)


def _cell(test: dict | None, metric: str) -> str:
    value = (test or {}).get(metric)
    return "-" if value is None else f"{100 * value:.2f}"


def run_warm_study(ws: Workspace, opts: StudyOptions, warm: list[int], progress: bool = True,
                   command: str = "recommend study") -> dict:
    """Study the base dataset and each warm-N variant; one side-by-side ``report.md``.

    Returns:
        ``{"report", "out", "table", "variants": [{"dataset", "min_item_interactions", "users",
        "items", "study"}]}``.
    """
    if not warm or min(warm) < 1:
        raise UserError("--warm takes item thresholds >= 1, e.g. --warm 20,50,200")
    base = PreparedDataset.load(ws.dataset_dir(opts.dataset))
    out = opts.out or ws.study_dir(f"{opts.dataset}-{store_spelling(opts.encoder)}-warm")
    variants = []
    for n in [None, *warm]:
        dataset = base if n is None else ensure_warm(ws, base, n)
        sub = dataclasses.replace(opts, dataset=dataset.name, out=out / ("base" if n is None else f"warm{n}"))
        result = run_study(ws, sub, progress=progress, command=command)
        variants.append({"dataset": dataset.name, "min_item_interactions": n or 1, "users": dataset.n_users,
                         "items": dataset.n_items, "study": result})
    table = side_by_side(variants)
    lines = [f"# Warm-N study: {opts.dataset}, {opts.encoder} (001 Table 3)", "",
             f"Command: `{command}`", "",
             "Test split, full item pool, history excluded; HR@10 / NDCG@10 in %. Each variant keeps the "
             "items with at least N distinct users in the raw data, then the base dataset's filters.", "",
             table, ""]
    lines += [f"- {v['dataset']}: {v['users']} users, {v['items']} items; report {v['study']['report']}"
              for v in variants]
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / REPORT, ("\n".join(lines) + "\n").encode())
    summary = {"report": str(out / REPORT), "out": str(out), "table": table,
               "variants": [{k: v for k, v in var.items() if k != "study"} | {"report": var["study"]["report"]}
                            for var in variants]}
    write_atomic(out / SUMMARY, (json.dumps(summary, indent=2, default=str) + "\n").encode())
    return {**summary, "variants": variants}


def side_by_side(variants: list[dict]) -> str:
    """Markdown: one row per configuration label (popularity first), HR@10 / NDCG@10 per variant."""
    labels = ["popularity"] + [c["label"] for c in variants[0]["study"]["configurations"]]
    head = "| run | " + " | ".join(f"{v['dataset']} HR@10 | NDCG@10" for v in variants) + " |"
    rule = "|---|" + "---|---|" * len(variants)
    rows = [head, rule]
    for label in labels:
        cells = []
        for v in variants:
            if label == "popularity":
                test = v["study"]["popularity"]
            else:
                test = next((c["test"] for c in v["study"]["configurations"] if c["label"] == label), None)
            cells += [_cell(test, "HR@10"), _cell(test, "NDCG@10")]
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"
