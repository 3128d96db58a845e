"""One row per run: what it was, what it cost, how well it ranks (001 Tables 5 and 6).

A run folder is read, never rebuilt: ``config.json`` (mode, layers, encoder, cost),
``metrics.jsonl`` (per-epoch seconds and peak memory), ``best.json`` (best validation
epoch) and ``eval.json`` (``eval rank`` results). Test results from ``eval.json`` are
preferred; a run never ranked on test shows its best validation metrics, and the
``source`` column says which, so a table never mixes the two silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from eval.metrics import percent
from featurestore.errors import UserError
from featurestore.runtime.files import read_json


MODE_LABELS = {"id": "IDRec", "ts": "TS", "e2e": "E2E", "adapter": "adapters", "side": "side (IISAN)"}


@dataclass
class RunSummary:
    """What the comparison table and plots show for one run."""

    name: str
    mode: str
    encoder: str
    layers: int | None
    trainable_params: int | None
    total_params: int | None
    epochs: int
    sec_per_epoch: float | None
    peak_rss_mb: float | None
    peak_gpu_mb: float | None
    metrics: dict = field(default_factory=dict)
    source: str = "none"
    dataset: str | None = None

    def metric(self, name: str) -> float | None:
        value = self.metrics.get(name)
        return None if value is None else float(value)

    @property
    def label(self) -> str:
        """The papers' name for the configuration: IDRec, TS, TS-DNN-8, E2E, adapters."""
        if self.mode == "ts-dnn":
            return f"TS-DNN-{self.layers}"
        return MODE_LABELS.get(self.mode, self.mode)


def _read_json(path: Path) -> dict | None:
    return read_json(path, "delete or repair it") if path.exists() else None


def _epochs(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_bytes().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut short by a killed job; the finished epochs still count
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _encoder(config: dict) -> str:
    """A short encoder label: ``config["encoder"]``, else the store groups' encoders."""
    if config.get("encoder"):
        return str(config["encoder"])
    features = config.get("features") or []
    if isinstance(features, (str, dict)):
        features = [features]
    names = []
    for feature in features:
        if isinstance(feature, str):
            names.append(feature.rstrip("/").split("/")[-1])
        elif isinstance(feature, dict):
            # the group's last part is ENCODER[@VARIANT]: a domain-adapted variant stays visible
            group = str(feature.get("group", ""))
            names.append(group.split("/")[-1] or feature.get("encoder")
                         or (feature.get("provenance") or {}).get("encoder"))
    label = "+".join(name for name in names if name)
    return label or ("id" if run_mode(config) == "id" else "-")


def _tower(config: dict) -> dict:
    """Where the run's tower settings live: the model spec, else the top level."""
    model = config.get("model") or {}
    return model.get("item_tower") or {}


def run_mode(config: dict) -> str:
    return str(config.get("mode") or _tower(config).get("name")
               or (config.get("options") or {}).get("mode") or "?")


def _layers(config: dict) -> int | None:
    for holder in (config, _tower(config), config.get("options") or {}):
        if holder.get("layers") is not None:
            return int(holder["layers"])
    return None


def _test_result(eval_json: dict | None) -> dict | None:
    """The newest full-pool test result on all users, history-excluded results first."""
    if not eval_json:
        return None
    candidates = [r for r in eval_json.values()
                  if isinstance(r, dict) and r.get("split") == "test" and r.get("subset", "all") == "all"]
    if not candidates:
        return None
    return max(candidates, key=lambda r: (bool(r.get("exclude_history")), r.get("evaluated_at", "")))


def _max(rows: list[dict], key: str) -> float | None:
    values = [float(r[key]) for r in rows if r.get(key) is not None]
    return max(values) if values else None


def summarize_run(run_dir: Path) -> RunSummary:
    """Read one run folder into a :class:`RunSummary`."""
    run_dir = Path(run_dir)
    config = _read_json(run_dir / "config.json")
    if config is None:
        raise UserError(f"{run_dir} is not a run folder (no config.json); see `recommend runs`")
    epochs = _epochs(run_dir)
    seconds = [float(r["seconds"]) for r in epochs if r.get("seconds") is not None]
    cost = config.get("cost") or {}
    test = _test_result(_read_json(run_dir / "eval.json"))
    best = _read_json(run_dir / "best.json")
    if test is not None:
        excluded = "history excluded" if test.get("exclude_history") else "history kept"
        metrics, source = test, f"test ({excluded}{', run unfinished' if test.get('unfinished_run') else ''})"
    elif best and best.get("metrics"):
        metrics, source = best["metrics"], f"valid (best epoch {best.get('epoch')})"
    else:
        metrics, source = {}, "none"
    return RunSummary(
        name=run_dir.name,
        mode=run_mode(config),
        encoder=_encoder(config),
        layers=_layers(config),
        trainable_params=cost.get("trainable_params"),
        total_params=cost.get("total_params"),
        epochs=len(epochs),
        sec_per_epoch=sum(seconds) / len(seconds) if seconds else None,
        peak_rss_mb=_max(epochs, "peak_rss_mb"),
        peak_gpu_mb=_max(epochs, "peak_gpu_mb"),
        metrics={k: v for k, v in metrics.items() if k.startswith(("HR@", "NDCG@"))},
        source=source,
        dataset=(config.get("dataset") or {}).get("name"),
    )


def reference_summaries(dataset, ks) -> list[RunSummary]:
    """Popularity and (for a generated dataset) oracle and oracle-without-links rows: test
    split, history excluded."""
    from data.oracle import reference_rows

    return [RunSummary(name=row["model"], mode=name, encoder="-", layers=None, trainable_params=0, total_params=0,
                       epochs=0, sec_per_epoch=None, peak_rss_mb=None, peak_gpu_mb=None,
                       metrics={k: v for k, v in row.items() if k.startswith(("HR@", "NDCG@"))},
                       source="test (history excluded)", dataset=dataset.name)
            for name, row in reference_rows(dataset, "test", ks).items()]


def metric_names(summaries: list[RunSummary]) -> list[str]:
    """HR@K and NDCG@K columns for every K any run reports, in K order."""
    ks = sorted({int(name.split("@")[1]) for s in summaries for name in s.metrics})
    return [f"{kind}@{k}" for k in ks for kind in ("HR", "NDCG")]


def _cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _percent(value: float | None, oracle: float | None) -> float | None:
    return None if value is None or not oracle else 100 * value / oracle


def markdown_table(summaries: list[RunSummary]) -> str:
    """The comparison as a markdown table; metrics shown in percent, as the papers do."""
    names = metric_names(summaries)
    oracles = {s.dataset: s for s in summaries if s.mode == "oracle"}
    relative = [n for n in names if n.startswith("HR@")][:1] if oracles else []
    header = ["run", "mode", "encoder", "layers", "trainable params", "total params",
              "s/epoch", "peak RSS MB", "peak GPU MB", *[f"{n} (%)" for n in names],
              *[f"{n} % of oracle" for n in relative], "source"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in summaries:
        oracle = oracles.get(s.dataset)
        row = [s.name, s.mode, s.encoder, _cell(s.layers, "d"), _cell(s.trainable_params, ",d"),
               _cell(s.total_params, ",d"), _cell(s.sec_per_epoch, ".1f"), _cell(s.peak_rss_mb, ".0f"),
               _cell(s.peak_gpu_mb, ".0f"),
               *[percent(s.metric(n)) for n in names],
               *[_cell(_percent(s.metric(n), oracle and oracle.metric(n)), ".1f") for n in relative],
               s.source]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"
