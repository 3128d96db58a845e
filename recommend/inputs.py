"""One protocol between an item tower and what it reads, so the trainer knows no mode.

Every ``--mode`` is one :class:`TowerKind` in :data:`recommend.item_towers.ITEM_TOWERS`.
The kind builds the tower (it is the registry's builder) and owns the tower's input
sources: store rows (``ts``, ``ts-dnn``), token states (``--fusion merge-attn``, ``e2e
--cached``), per-layer states (``side``) or the live encoder over decoded items
(``e2e``, ``adapter``). The trainer, :func:`recommend.run.load_run` and
:mod:`recommend.transfer` only call the methods below; adding a tower is one module
with one kind, registered under its mode.

A source is whatever the kind's tower reads batches from (``gather(ids)``-style, the
tower knows its own); all sources share :meth:`ItemSource.record`, the entry
``config.json`` keeps under ``features`` to find and check it again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Protocol, Sequence

if TYPE_CHECKING:
    from data.dataset import PreparedDataset
    from featurestore.workspace import Workspace
    from recommend.item_towers import ItemTower
    from recommend.options import TrainOptions


class ItemSource(Protocol):
    """An opened, checked input of an item tower."""

    def record(self) -> dict:
        """What config.json keeps about this input (group, fingerprint, provenance)."""


class TowerKind:
    """One ``--mode``: its options, its checks, its inputs, its tower, and what the study, the
    search and transfer need to know of it.

    Everything a caller asks a mode goes through these members; no module outside the mode
    names it. ``options`` is the mode's option dataclass (fields made with
    :func:`recommend.options.option`): the CLI builds flags from it, and every other mode
    refuses them with the field's ``purpose``.
    """

    options: type | None = None
    summary = ""  # one line for `recommend train --mode` in --help
    reads_store_rows = False  # its inputs are store rows: `recommend train` infers the only group
    runs_encoder_live = False  # runs the encoder every step: `recommend study --live-epochs` caps it
    search_space: Mapping[str, dict] = {}  # what `recommend tune` searches besides the shared options
    lr_donor: int | None = None  # a study lends this mode's tuned lr to untuned modes (lower: preferred)
    transfer_settings: tuple[str, ...] = ("name",)  # spec entries that must match to copy weights

    def __call__(self, spec: dict, sources: Sequence[Any], fit: bool) -> ItemTower:
        """Build the tower from its spec and opened sources (``fit``: fit data-derived state)."""
        raise NotImplementedError

    def check(self, opts: TrainOptions) -> TrainOptions:
        """Refuse option combinations this mode cannot train; return a copy with its defaults filled."""
        return opts

    def spec(self, opts: TrainOptions, dataset: str) -> dict:
        """The item-tower settings of the model spec (plain data; ``name`` is the mode)."""
        return {"name": opts.mode, "dropout": opts.dropout}

    def study_rows(self, mode: str, study: Any) -> list[tuple[str, dict]]:
        """The rows ``recommend study`` trains for this mode: ``(label, options)`` each."""
        return [(mode, {})]

    def study_extraction(self, study: Any) -> tuple[int | str | None, str] | None:
        """The store group a study row reads, as ``(--cache-layer, what it is for)`` (None: the plain
        pooled group), extracted by the study if missing; None when the mode reads no store group."""
        return None

    def study_inputs(self, ws: Workspace, study: Any, extracted: Any, progress: bool) -> dict | None:
        """Make what this mode's study rows read, if missing, and return its signature (hashed into the
        rows' run names: re-made inputs are new runs); None when they read nothing.

        ``extracted(cache_layer, purpose) -> signature`` extracts the study encoder's store group once
        per study, whichever modes ask; a mode with a job of its own (``sid``: the codes) runs it here.
        """
        need = self.study_extraction(study)
        return extracted(*need) if need else None

    def encoder_lr(self, opts: TrainOptions) -> float | None:
        """The learning rate of the pretrained weights the tower fine-tunes (None: ``--lr``)."""
        return None

    def finish(self, model: Any, spec: dict) -> None:
        """Change the built Recommender where the mode reaches past its tower (adapters in the user encoder)."""

    def dt_layer_keys(self, tower: dict) -> dict[str, str] | None:
        """Where a tower of spec ``tower`` keeps the DT layer over one encoder's pooled output: its
        state-dict names (below ``item_tower.``) for ``weight``, ``bias`` and ``missing`` (the learned
        no-content vector), which a warm start copies between modes (TS -> e2e); None: no such layer."""
        return None

    def user_encoder_additions(self, tower: dict) -> Any:
        """What the mode adds to the user encoder of a run with item-tower spec ``tower`` (None: nothing);
        transfer copies a user encoder only between runs that add the same."""
        return None

    def open(self, ws: Workspace, opts: TrainOptions, dataset: PreparedDataset) -> list[ItemSource]:
        """Open the inputs a training run reads, refusing any built for another dataset fingerprint."""
        return []

    def reopen(self, ws: Workspace, config: dict) -> list[ItemSource]:
        """Open the inputs a run's ``config.json`` names, checked against its dataset fingerprint."""
        return []

    def retarget(self, config: dict, dataset: PreparedDataset) -> dict:
        """The config as if trained over ``dataset``'s items: what zero-shot ranking reopens."""
        return {**config, "dataset": {"name": dataset.name, "fingerprint": dataset.fingerprint},
                "model": {**config["model"], "n_items": dataset.n_items}}

    def feature_problems(self, source: Sequence[dict], target: Sequence[dict]) -> list[str]:
        """Why inputs described by ``target`` records cannot feed a tower trained on ``source``'s."""
        return []

    def describe(self, config: dict, model: Any) -> None:
        """Add what only the built model knows (encoder provenance, weights identity) to ``config``."""
