"""``--mode sid``: the item vector is built from the item's semantic ID, the codes of its content.

Singh et al. ("Better Generalization with Semantic IDs", RecSys 2024) replace the random item id
by the L codes that residual quantisation of the frozen content vector gives (TIGER, NeurIPS
2023; ``featurestore codes``, :mod:`extract.codes`) and embed them:

- ``prefix`` (their best, the default): one table per level l, one row per code prefix
  ``(c1..cl)`` that occurs in the catalogue, the rows of an item's L prefixes summed;
- ``sum``: one table per level, one row per code, summed (L x K rows at most: the smallest table).

Items with similar content share prefixes, so they share rows: a cold or long-tail item starts
from what its neighbours learned, at an ID model's cost per step. Level 1 starts as an ID table
does (Xavier); deeper levels start at zero, so a refinement nobody trained (a cold item's own
last prefix) adds nothing. Items without content get a "no content" code at every level.
Items sharing all L codes share one vector; full-pool ranking ranks such a target below every
item of equal score (the pessimistic tie rule of :mod:`eval.ranking`). ``--with-id add`` adds a
learned ID (001 Table 7's ID + modality), which tells them apart again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from torch import nn

from extract.codes import CODES, CodesOptions, codes_command, codes_group, run_codes
from featurestore.errors import UserError
from featurestore.store import STATUS_COMPLETE, FeatureStore, parse_group_name
from recommend.item_towers import ITEM_TOWERS, ContentOptions, ItemTower, StoreGroupsKind, content_spec
from recommend.options import TrainOptions, fill, option

if TYPE_CHECKING:
    from data.dataset import PreparedDataset
    from featurestore.workspace import Workspace

SID_EMBEDDINGS = ("prefix", "sum")
STUDY_CODES = {"method": "rq-kmeans", "levels": 3, "codebook": 256}  # the codes group a study row reads


@dataclass(frozen=True)
class SidOptions(ContentOptions):
    """The codes group and how its codes become a vector (``--with-id`` from the content options)."""

    codes: str | None = option(
        flag="--codes", metavar="GROUP", purpose="names the semantic-ID codes; it needs --mode sid",
        help="sid: the codes group written by `featurestore codes` (DATASET/codes/ENC@METHOD-LxK).")
    sid_embed: str | None = option(
        flag="--sid-embed", choices=SID_EMBEDDINGS, purpose="embeds semantic-ID codes; it needs --mode sid",
        help="sid: prefix = one row per code prefix (c1..cl) per level, summed (Singh et al.'s best); sum = one "
             "row per code per level, summed [default: prefix].")


@dataclass
class CodeSource:
    """An opened, checked codes group: every item's codes (row 0 = padding)."""

    group: str
    codes: np.ndarray  # (N + 1, L) int64
    present: np.ndarray  # (N + 1,) bool: the item had a content vector to quantise
    fingerprint: str
    attrs: dict = field(default_factory=dict, repr=False)

    def record(self) -> dict:
        keep = ("source", "method", "levels", "codebook", "seed", "disambiguate", "quantiser_sha256",
                "codes_sha256", "command")
        return {"group": self.group, "fingerprint": self.fingerprint, "dim": int(self.codes.shape[1]),
                "missing": int((~self.present[1:]).sum()),
                "provenance": {k: self.attrs[k] for k in keep if k in self.attrs}}


def open_codes(ws: Workspace, group: str, fingerprint: str, n_items: int) -> CodeSource:
    """Open a complete codes group of this dataset version, each refusal with its fix."""
    name = str(parse_group_name(group))
    store = FeatureStore(ws.store)
    if not store.exists(name):
        raise UserError(f"no codes group {name}; write it with `{codes_command(name)}`")
    fg = store.open(name)
    if fg.attrs.get("kind") != CODES:
        parsed = parse_group_name(name)
        raise UserError(f"store group {name} holds vectors, not codes; quantise it first: `featurestore codes "
                        f"--dataset {parsed.dataset} --encoder {parsed.encoder}` and pass the codes group to --codes")
    command = fg.attrs.get("command") or codes_command(name)
    if fg.status != STATUS_COMPLETE:
        raise UserError(f"codes group {name} is {fg.status}; finish it with `{command}`")
    if fg.fingerprint != fingerprint or fg.rows != n_items + 1:
        raise UserError(f"codes group {name} was made for dataset fingerprint {fg.fingerprint} ({fg.rows - 1} "
                        f"items), the dataset has {fingerprint} ({n_items}); remake it: `featurestore rm {name}`, "
                        f"then `{command}`")
    present = np.asarray(fg.present(), dtype=bool).copy()
    present[0] = False
    return CodeSource(fg.name, np.asarray(fg.memmap(), dtype=np.int64), present, fg.fingerprint, dict(fg.attrs))


def code_rows(codes: np.ndarray, present: np.ndarray, how: str) -> tuple[np.ndarray, list[int]]:
    """Each item's row in each level's table, and the tables' sizes (the last row: padding, item 0).

    Level l keys an item by its code at l (``sum``) or its prefix up to l (``prefix``); rows are
    the distinct keys in sorted order. Items without content carry code -1 at every level.
    """
    keyed = np.where(present[:, None], codes, -1)[1:]
    index = np.empty(codes.shape, dtype=np.int64)
    sizes = []
    for level in range(codes.shape[1]):
        keys = keyed[:, level:level + 1] if how == "sum" else keyed[:, :level + 1]
        _, inverse = np.unique(keys, axis=0, return_inverse=True)
        sizes.append(int(inverse.max()) + 1)
        index[1:, level] = inverse.reshape(-1)
        index[0, level] = sizes[-1]
    return index, sizes


class SidTower(ItemTower):
    """Item id -> the sum of its codes' rows, one table per level."""

    def __init__(self, source: CodeSource, dim: int, how: str) -> None:
        super().__init__()
        self.n_items, self.dim = len(source.codes) - 1, dim
        index, sizes = code_rows(source.codes, source.present, how)
        self.register_buffer("index", torch.from_numpy(index), persistent=False)
        self.tables = nn.ModuleList(nn.Embedding(rows + 1, dim, padding_idx=rows) for rows in sizes)
        nn.init.xavier_normal_(self.tables[0].weight)
        for table in self.tables[1:]:
            nn.init.zeros_(table.weight)
        with torch.no_grad():
            self.tables[0].weight[-1].zero_()  # the padding row

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.index[ids]
        return torch.stack([table(rows[..., level]) for level, table in enumerate(self.tables)]).sum(0)

    def cost_parts(self) -> dict:
        return {"code_tables": self.tables}


class SidKind(StoreGroupsKind):
    """``sid``: reads one codes group."""

    options = SidOptions
    summary = "semantic IDs: summed embeddings of the codes of the item's content (TIGER, Singh et al.)"
    transfer_settings = ("name", "sid_embed", "with_id")

    def __call__(self, spec: dict, sources: Sequence[CodeSource], fit: bool) -> ItemTower:
        if len(sources) != 1:
            raise UserError("--mode sid reads one codes group; name it with --codes GROUP")
        return SidTower(sources[0], spec["dim"], spec["sid_embed"])

    def check(self, opts: TrainOptions) -> TrainOptions:
        if opts.encoders or opts.features or opts.fusion or opts.whiten:
            raise UserError("--mode sid reads item codes, not vectors; drop --encoder/--features/--fusion/--whiten "
                            "and name the codes with --codes GROUP (made by `featurestore codes`)")
        if not opts.codes:
            raise UserError("--mode sid needs --codes GROUP: the codes `featurestore codes --dataset D --encoder "
                            "ENC` writes (`featurestore ls` lists DATASET/codes/... groups)")
        return fill(opts, sid_embed=SID_EMBEDDINGS[0])

    def spec(self, opts: TrainOptions, dataset: str) -> dict:
        return content_spec(opts, sid_embed=opts.sid_embed)

    def open(self, ws: Workspace, opts: TrainOptions, dataset: PreparedDataset) -> list[CodeSource]:
        return [open_codes(ws, opts.codes, dataset.fingerprint, dataset.n_items)]

    def open_group(self, ws: Workspace, group: str, fingerprint: str, n_items: int) -> CodeSource:
        return open_codes(ws, group, fingerprint, n_items)

    def reopen(self, ws: Workspace, config: dict) -> list[CodeSource]:
        sources = super().reopen(ws, config)
        for source, recorded in zip(sources, config.get("features", [])):
            if source.attrs.get("codes_sha256") != recorded["provenance"].get("codes_sha256"):
                raise UserError(f"codes group {source.group} was rewritten after this run trained on it; "
                                "its item rows no longer match the codes (train the run again)")
        return sources

    def feature_problems(self, source: Sequence[dict], target: Sequence[dict]) -> list[str]:
        mine = [s["provenance"].get("quantiser_sha256") for s in source]
        theirs = [t["provenance"].get("quantiser_sha256") for t in target]
        if mine == theirs:
            return []
        return [f"codes {', '.join(t['group'] for t in target)} come from another quantiser than the source's "
                f"({', '.join(s['group'] for s in source)}); a code means something only to the quantiser "
                "that made it"]

    def study_rows(self, mode: str, study: Any) -> list[tuple[str, dict]]:
        group = codes_group(study.dataset, study.encoder, **STUDY_CODES)
        return [(mode, {"codes": group}), (f"{mode}+id", {"codes": group, "with_id": "add"})]

    def study_inputs(self, ws: Workspace, study: Any, extracted: Any, progress: bool) -> dict:
        """The study encoder's store group, then its codes (``featurestore codes`` with :data:`STUDY_CODES`,
        made once and reused); the codes' hash names the rows' runs."""
        features = extracted(None, f"features of {study.dataset} by {study.encoder} (quantised into the sid "
                                   "rows' codes)")
        result = run_codes(ws, CodesOptions(dataset=study.dataset, encoder=study.encoder, **STUDY_CODES))
        attrs = FeatureStore(ws.store).open(result.group).attrs
        return {"features": features, "codes_sha256": attrs.get("codes_sha256")}


ITEM_TOWERS.register("sid")(SidKind())
