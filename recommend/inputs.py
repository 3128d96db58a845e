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

from featurestore.errors import UserError

if TYPE_CHECKING:
    from data.dataset import PreparedDataset
    from featurestore.workspace import Workspace
    from recommend.item_towers import ItemTower


class ItemSource(Protocol):
    """An opened, checked input of an item tower."""

    def record(self) -> dict:
        """What config.json keeps about this input (group, fingerprint, provenance)."""


class TowerKind:
    """One ``--mode``: its options, its inputs, its tower.

    ``options`` maps the :class:`recommend.trainer.TrainOptions` fields only this
    kind reads to ``(flag, what it is for)``; :func:`refuse_foreign_options` rejects
    them under every other mode with that text.
    """

    options: Mapping[str, tuple[str, str]] = {}

    def __call__(self, spec: dict, sources: Sequence[Any], fit: bool) -> ItemTower:
        """Build the tower from its spec and opened sources (``fit``: fit data-derived state)."""
        raise NotImplementedError

    def check(self, opts: Any) -> None:
        """Refuse option combinations this mode cannot train; fill its defaults (in place)."""

    def spec(self, opts: Any, dataset: str) -> dict:
        """The mode's item-tower settings for the model spec (plain data)."""
        return {}

    def open(self, ws: Workspace, opts: Any, dataset: PreparedDataset) -> list[ItemSource]:
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


def refuse_foreign_options(kinds: Mapping[str, TowerKind], opts: Any) -> None:
    """Refuse options that belong to other modes than ``opts.mode``, with what they are for."""
    own = kinds[opts.mode].options
    for kind in kinds.values():
        for field, (flag, purpose) in kind.options.items():
            value = getattr(opts, field)
            if field not in own and value is not None and value is not False:
                raise UserError(f"{flag} {purpose}, not --mode {opts.mode}")
