"""Item towers: item ids -> item vectors, the only piece IDRec and MoRec differ in.

Paper 001 (Fig. 1): IDRec learns an embedding per item id; MoRec replaces it with a
modality encoder followed by a dense "DT layer" to the recommender width. The
towers here:

- ``id``: the ID embedding table (IDRec).
- ``ts``: stored encoder vectors through the DT layer, ``Linear(feat -> d)``.
- ``ts-dnn``: stored vectors through a TS-DNN-N stack (001 Table 5), one of
  :data:`TS_DNN_STACKS`: ``residual`` (the default: the DT layer, then N pre-LN residual
  blocks whose branches start at zero, so TS-DNN-N starts as TS and deepens from there) or
  ``paper`` (the paper's public code exactly: ``Linear(feat -> d) + GELU``, then
  N x ``[Dropout, Linear(d, d), GELU]``). The paper's stack, Xavier-initialised, shrinks
  its output about 4x per layer (norm 0.27 -> 0.001 at N = 8 on MiniLM vectors), so at
  d 64 a deep one sits on the popularity plateau for tens of epochs.

Two stored groups (text + image) are each projected to ``d`` and merged by a fusion
(``concat | sum | gate | film``, papers 002/003). ``with_id`` adds an ID table to any
content tower (``add | concat``, 001 Table 7).

Every tower maps ids of any shape to ``(..., d)`` and lists the whole catalogue in
batches (:meth:`ItemTower.all_vectors`). Each mode is a :class:`recommend.inputs.TowerKind`
in :data:`ITEM_TOWERS`: it builds the tower and opens, checks and describes what the
tower reads; the live-encoder and side towers (``recommend.e2e``, ``recommend.adapters``,
``recommend.side``) register their kinds here the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from featurestore.errors import UserError
from recommend.features import (FeatureSource, feature_differences, fit_whitening, open_source, resolve_groups,
                                retarget_group)
from featurestore.registry import Registry
from recommend.inputs import TowerKind
from recommend.options import TrainOptions, fill, option

if TYPE_CHECKING:
    from data.dataset import PreparedDataset
    from featurestore.workspace import Workspace

# --mode -> its kind (builds the tower, owns its options and inputs); recommend.plugins lists the modules
ITEM_TOWERS: Registry[TowerKind] = Registry("item tower", plugins=("recommend.plugins",))
FUSIONS: Registry[nn.Module] = Registry("fusion")
# Fusions over the groups' token / patch states instead of their pooled vectors (recommend.merge_attn).
TOKEN_FUSIONS: Registry[Callable[..., "ItemTower"]] = Registry("token fusion", plugins=("recommend.plugins",))
WITH_ID_MODES = ("add", "concat")


class ItemTower(nn.Module):
    """Maps item ids (LongTensor of any shape) to vectors ``(..., dim)``."""

    dim: int
    n_items: int

    def all_vectors(self, batch_size: int = 4096) -> torch.Tensor:
        """Vectors of ids 0..N, computed ``batch_size`` ids at a time: ``(N + 1, dim)``."""
        device = _device_of(self)
        chunks = [
            self(torch.arange(start, min(start + batch_size, self.n_items + 1), device=device))
            for start in range(0, self.n_items + 1, batch_size)
        ]
        return torch.cat(chunks)

    def pretrained_parameters(self) -> Iterator[nn.Parameter]:
        """Pretrained encoder weights this tower fine-tunes (the optimiser gives them ``--encoder-lr``)."""
        return iter(())

    def identity(self) -> dict:
        """Spec entries only the built tower knows (the frozen encoder's ``state_sha256``)."""
        return {}

    def own_table(self) -> torch.Tensor | None:
        """The ``(N + 1, d)`` weight that is every item's vector, for a tower that is one table (IDRec);
        a catalogue loss then reads it directly instead of running the tower over every item."""
        return None

    def cost_parts(self) -> dict:
        """Parts of this tower worth their own line in the parameter breakdown (``recommend.cost``)."""
        return {}


def _device_of(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def _xavier_init(module: nn.Module) -> None:
    """The papers' initialisation: Xavier-normal weights, zero biases (and a residual block's
    branch at zero, so it starts as the identity)."""
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Embedding)):
            nn.init.xavier_normal_(sub.weight)
            if isinstance(sub, nn.Embedding) and sub.padding_idx is not None:
                with torch.no_grad():
                    sub.weight[sub.padding_idx].zero_()
        if isinstance(sub, nn.Linear) and sub.bias is not None:
            nn.init.zeros_(sub.bias)
    for sub in module.modules():  # after the Linears above, which a zero-initialised block contains
        if getattr(sub, "zero_init", False):
            nn.init.zeros_(sub.linear.weight)


class IdEmbedding(ItemTower):
    """IDRec: one learned vector per item id; id 0 is the zero padding row."""

    def __init__(self, n_items: int, dim: int) -> None:
        super().__init__()
        self.n_items, self.dim = n_items, dim
        self.table = nn.Embedding(n_items + 1, dim, padding_idx=0)
        _xavier_init(self)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table(ids)

    def own_table(self) -> torch.Tensor:
        return self.table.weight


def dt_layer(feat_dim: int, dim: int) -> nn.Sequential:
    """The DT layer of TS: a dense map from encoder width to recommender width."""
    return nn.Sequential(nn.Linear(feat_dim, dim))


TS_DNN_STACKS: Registry[nn.Module] = Registry("TS-DNN stack")  # --dnn -> builder
DEFAULT_TS_DNN_STACK = "residual"


@TS_DNN_STACKS.register("paper")
def ts_dnn_stack(feat_dim: int, dim: int, layers: int, dropout: float = 0.1) -> nn.Sequential:
    """TS-DNN-N exactly as the paper's public code (``MLP_Layers``).

    ``Linear(feat -> d) + GELU``, then ``layers`` x ``[Dropout, Linear(d, d), GELU]``;
    parameters: ``feat*d + d + layers*(d*d + d)``.
    """
    modules: list[nn.Module] = [nn.Linear(feat_dim, dim), nn.GELU()]
    for _ in range(layers):
        modules += [nn.Dropout(dropout), nn.Linear(dim, dim), nn.GELU()]
    return nn.Sequential(*modules)


class ResidualBlock(nn.Module):
    """``x + Dropout(GELU(Linear(LayerNorm(x))))`` with the Linear's weight starting at
    zero (timm's ``zero_init_last``): the block starts as the identity and still receives
    a gradient (GELU'(0) = 1/2), so depth can only be added, never a starting handicap."""

    zero_init = True

    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.linear = nn.Linear(dim, dim)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dropout(self.act(self.linear(self.norm(x))))


@TS_DNN_STACKS.register("residual")
def ts_dnn_residual_stack(feat_dim: int, dim: int, layers: int, dropout: float = 0.1) -> nn.Sequential:
    """TS-DNN-N as the DT layer ``Linear(feat -> d)`` followed by ``layers`` residual
    blocks; parameters: ``feat*d + d + layers*(d*d + 3d)``. At N = 0 it is TS."""
    return nn.Sequential(nn.Linear(feat_dim, dim), *(ResidualBlock(dim, dropout) for _ in range(layers)))


class StoredFeatures(nn.Module):
    """Rows of one store group for a batch of ids, gathered from the memory map.

    Missing content (``present = false``: no image, empty text) is handled
    explicitly: those items get ``missing``, a learned vector in the input space,
    instead of the store's meaningless zero row, so the tower learns what "no
    picture" should mean. With ``whiten``, rows are PCA-whitened by buffers that
    are saved in the checkpoint (fitted on the catalogue when ``fit`` is true).
    """

    def __init__(self, source: FeatureSource, whiten: bool, fit: bool) -> None:
        super().__init__()
        self.source = source
        self.register_buffer("present", torch.from_numpy(source.present.copy()), persistent=False)
        self.missing = nn.Parameter(torch.zeros(source.dim))
        self.whiten = whiten
        if whiten:
            mean, proj = fit_whitening(source) if fit else (
                np.zeros(source.dim, np.float32), np.zeros((source.dim, source.dim), np.float32))
            self.register_buffer("white_mean", torch.from_numpy(mean))
            self.register_buffer("white_proj", torch.from_numpy(proj))

    @property
    def dim(self) -> int:
        return self.source.dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids`` (P,) distinct item ids -> (P, feat) rows on the tower's device."""
        rows = torch.from_numpy(self.source.gather(ids.cpu().numpy())).to(self.missing.device)
        if self.whiten:
            rows = (rows - self.white_mean) @ self.white_proj
        return torch.where(self.present[ids].unsqueeze(-1), rows, self.missing)


class FeatureTower(ItemTower):
    """Stored vectors of one or two groups, each projected to ``dim``, then fused.

    Ids are deduplicated per call, so a batch reads and projects each item once.
    """

    def __init__(
        self,
        sources: Sequence[FeatureSource],
        n_items: int,
        dim: int,
        projection: Callable[[int, int], nn.Module],
        fusion: str | None,
        whiten: bool,
        fit: bool,
    ) -> None:
        super().__init__()
        self.n_items, self.dim = n_items, dim
        self.inputs = nn.ModuleList(StoredFeatures(s, whiten, fit) for s in sources)
        self.projections = nn.ModuleList(projection(inp.dim, dim) for inp in self.inputs)
        self.fusion = FUSIONS.create(fusion, dim) if len(sources) > 1 else None
        _xavier_init(self)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        vectors, inverse = self._distinct_vectors(ids)
        fused = self.fusion(vectors) if self.fusion is not None else vectors[0]
        return fused[inverse].reshape(*ids.shape, self.dim)

    def modality_vectors(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """Each group's projected vector ``(..., dim)`` before fusion, in group order.

        PMMRec's NICL (paper 002 Eq. 8) contrasts the text and image vectors of an
        item with each other, so it needs them apart; they are exactly what
        ``forward`` fuses (same projections, same dropout mode).
        """
        vectors, inverse = self._distinct_vectors(ids)
        return [v[inverse].reshape(*ids.shape, self.dim) for v in vectors]

    def _distinct_vectors(self, ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per group, the projected vectors of the distinct ids; and each id's row in them."""
        unique, inverse = torch.unique(ids.reshape(-1), return_inverse=True)
        return [proj(inp(unique)) for inp, proj in zip(self.inputs, self.projections)], inverse


class WithId(ItemTower):
    """ID + modality (001 Table 7): an ID table added to, or concatenated with, content."""

    def __init__(self, content: ItemTower, how: str) -> None:
        super().__init__()
        if how not in WITH_ID_MODES:
            raise UserError(f"unknown --with-id {how!r}; known: {', '.join(WITH_ID_MODES)}")
        self.n_items, self.dim = content.n_items, content.dim
        self.content = content
        self.ids = IdEmbedding(content.n_items, content.dim)
        self.how = how
        self.merge = nn.Linear(2 * self.dim, self.dim) if how == "concat" else None
        if self.merge is not None:
            _xavier_init(self.merge)

    def pretrained_parameters(self) -> Iterator[nn.Parameter]:
        return self.content.pretrained_parameters()

    def identity(self) -> dict:
        return self.content.identity()

    def cost_parts(self) -> dict:
        return self.content.cost_parts()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        content, learned = self.content(ids), self.ids(ids)
        if self.merge is None:
            return content + learned
        return self.merge(torch.cat([content, learned], dim=-1))


# --- fusion of two modality vectors (papers 002, 003) --------------------------------


class ConcatFusion(nn.Module):
    """``Linear([a; b] -> d)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(2 * dim, dim)

    def forward(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        return self.proj(torch.cat(vectors, dim=-1))


class SumFusion(nn.Module):
    """``a + b``: no parameters."""

    def __init__(self, dim: int) -> None:
        super().__init__()

    def forward(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(vectors).sum(0)


class GateFusion(nn.Module):
    """``g * a + (1 - g) * b`` with a per-dimension gate ``g = sigmoid(W[a; b])``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gate = nn.Linear(2 * dim, dim)

    def forward(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        a, b = vectors
        g = torch.sigmoid(self.gate(torch.cat([a, b], dim=-1)))
        return g * a + (1 - g) * b


class FiLMFusion(nn.Module):
    """FiLM: the second modality scales and shifts the first, ``a * (1 + gamma(b)) + beta(b)``.

    Written with ``1 + gamma`` so that a zero ``gamma`` leaves ``a`` unscaled.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.film = nn.Linear(dim, 2 * dim)

    def forward(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        a, b = vectors
        gamma, beta = self.film(b).chunk(2, dim=-1)
        return a * (1 + gamma) + beta


FUSIONS.register("concat")(ConcatFusion)
FUSIONS.register("sum")(SumFusion)
FUSIONS.register("gate")(GateFusion)
FUSIONS.register("film")(FiLMFusion)


# --- the modes' options --------------------------------------------------------------


def _fusion_names() -> list[str]:
    return [*FUSIONS.names(), *TOKEN_FUSIONS.names()]


@dataclass(frozen=True)
class ContentOptions:
    """What a mode reading item content is given: its encoders or store groups, how two merge."""

    encoders: list[str] = option(
        flag="--encoder", multiple=True, metavar="ENC[,ENC]", purpose="names the content a content mode reads",
        help="Use the store group DATASET/<modality>/ENC written by `featurestore extract --encoder ENC` "
             "(ENC@VARIANT for a variant); two names = text + image. e2e/adapter: the encoder to run live; "
             "side: the groups holding --cache-layer all [default for ts/ts-dnn: the dataset's only complete "
             "store group].")
    features: list[str] = option(
        flag="--features", multiple=True, metavar="GROUP[,GROUP]", purpose="names store groups a content mode reads",
        help="Store groups by full name DATASET/MODALITY/ENCODER[@VARIANT]; two = fused.")
    fusion: str | None = option(
        flag="--fusion", choices=_fusion_names, purpose="merges two feature groups",
        help="How two groups merge after their own projections to d: concat (Linear over [a;b]), sum, gate "
             "(sigmoid gate), film (b scales and shifts a); merge-attn: one Transformer block over [CLS; text "
             "tokens; image patches] (PMMRec), reading the token states of `featurestore extract --cache-layer "
             "0` [default with two groups: concat].")
    with_id: str | None = option(
        flag="--with-id", choices=WITH_ID_MODES, purpose="adds an ID table to a content mode",
        help="Also learn an ID embedding and add it to the content vector, or concatenate and project "
             "(001 Table 7).")
    whiten: bool = option(False, flag="--whiten", is_flag=True, purpose="transforms stored vectors",
                          help="PCA-whiten the stored vectors (fitted on the catalogue with scikit-learn; saved in "
                               "the checkpoint).")


DEFAULT_TS_DNN_LAYERS = 8


@dataclass(frozen=True)
class TsDnnOptions(ContentOptions):
    """TS-DNN-N: the depth and the stack."""

    layers: int | None = option(flag="--layers", min=0, purpose="sets the TS-DNN depth; it needs --mode ts-dnn",
                                help=f"TS-DNN depth N: N blocks on top of the DT layer (--mode ts-dnn only) "
                                     f"[default: {DEFAULT_TS_DNN_LAYERS}].")
    dnn: str | None = option(
        flag="--dnn", choices=TS_DNN_STACKS, purpose="picks the TS-DNN stack; it needs --mode ts-dnn",
        help="ts-dnn: the stack. residual = Linear(feat->d), then N x [LayerNorm, Linear(d,d), GELU, Dropout] "
             "added to its input, each branch starting at zero, so TS-DNN-N starts as TS; paper = the paper's "
             "code, Linear(feat->d)+GELU, then N x [Dropout, Linear(d,d), GELU]. Differs from the papers because "
             "their stack, Xavier-initialised, shrinks item vectors ~4x per layer and at d 64 a deep one sits on "
             f"the popularity plateau for tens of epochs [default: {DEFAULT_TS_DNN_STACK}].")


def content_groups(opts: TrainOptions) -> int:
    return len(opts.encoders) + len(opts.features)


def check_content(opts: TrainOptions) -> TrainOptions:
    """The rules of stored content every content mode shares: a fusion merges exactly two groups
    (concat by default), whitening needs groups and pooled vectors."""
    if opts.fusion is not None:
        if opts.fusion in TOKEN_FUSIONS and opts.whiten:
            raise UserError(f"--whiten transforms pooled vectors, and --fusion {opts.fusion} reads token states; "
                            "drop --whiten")
        if content_groups(opts) != 2:
            raise UserError("--fusion merges two feature groups (text + image); name two with "
                            "--features TEXT_GROUP,IMAGE_GROUP or --encoder TEXT_ENC,IMAGE_ENC")
    elif content_groups(opts) == 2:
        opts = opts.replace(fusion="concat")
    if opts.whiten and content_groups(opts) == 0:
        raise UserError("--whiten transforms stored features; it needs --mode ts/ts-dnn with "
                        "--encoder or --features")
    return opts


def content_spec(opts: TrainOptions, **own: Any) -> dict:
    """The item-tower spec of a content mode: the shared settings, then the mode's ``own``."""
    tower = {"name": opts.mode, "dropout": opts.dropout, "whiten": opts.whiten}
    for name in ("layers", "dnn", "fusion", "with_id"):
        if getattr(opts, name):
            tower[name] = getattr(opts, name)
    return {**tower, **own}


# --- the registry: one kind per --mode ----------------------------------------------


def _need_sources(spec: dict, sources: Sequence[FeatureSource]) -> None:
    if not sources:
        raise UserError(
            f"--mode {spec['name']} trains on stored features; name them with --encoder ENC "
            "or --features DATASET/MODALITY/ENCODER"
        )
    if len(sources) > 2:
        raise UserError(f"at most two feature groups (text + image) can be fused, got {len(sources)}")


class IdKind(TowerKind):
    """``id``: reads nothing but the item ids."""

    options = ContentOptions  # declared so that each gets this mode's own refusal below
    summary = "IDRec embedding table"
    lr_donor = 2
    refusal = ("--mode id learns one vector per item and reads no features; "
               "drop --encoder/--features, or use --mode ts / ts-dnn")

    def __call__(self, spec: dict, sources: Sequence[FeatureSource], fit: bool) -> ItemTower:
        if sources:
            raise UserError(self.refusal)
        return IdEmbedding(spec["n_items"], spec["dim"])

    def check(self, opts: TrainOptions) -> TrainOptions:
        if opts.encoders or opts.features:
            raise UserError(self.refusal)
        check_content(opts)
        if opts.with_id:
            raise UserError(WITH_ID_REFUSAL)
        return opts

    def spec(self, opts: TrainOptions, dataset: str) -> dict:
        return content_spec(opts)


WITH_ID_REFUSAL = "--with-id combines an ID table with content; it needs --mode ts or ts-dnn"


class StoreGroupsKind(TowerKind):
    """A kind whose inputs are store groups listed under config.json's ``features``, each opened by
    :meth:`open_group` (which refuses a group of another dataset fingerprint)."""

    transfer_settings = ("name", "fusion", "whiten")

    def open_group(self, ws: Workspace, group: str, fingerprint: str, n_items: int) -> Any:
        raise NotImplementedError

    def reopen(self, ws: Workspace, config: dict) -> list:
        return [self.open_group(ws, f["group"], config["dataset"]["fingerprint"], config["model"]["n_items"])
                for f in config.get("features", [])]

    def retarget(self, config: dict, dataset: PreparedDataset) -> dict:
        moved = super().retarget(config, dataset)
        moved["features"] = [{**f, "group": retarget_group(f["group"], dataset.name)}
                             for f in config.get("features", [])]
        return moved

    def feature_problems(self, source: Sequence[dict], target: Sequence[dict]) -> list[str]:
        return feature_differences(source, target)


class StoredRowsKind(StoreGroupsKind):
    """``ts`` / ``ts-dnn``: rows of one or two store groups (or, for ``--fusion merge-attn``,
    their token states), each through the mode's projection, then fused."""

    reads_store_rows = True

    def __init__(self, summary: str, projection: Callable[[dict], Callable[[int, int], nn.Module]],
                 options: type = ContentOptions, defaults: dict | None = None,
                 search_space: dict | None = None, transfer_settings: tuple[str, ...] = (), lr_donor: int = 1) -> None:
        self.summary, self.projection = summary, projection
        self.lr_donor = lr_donor
        self.options = options
        self.defaults = defaults or {}
        self.search_space = search_space or {}
        self.transfer_settings = StoreGroupsKind.transfer_settings + transfer_settings

    def __call__(self, spec: dict, sources: Sequence[FeatureSource], fit: bool) -> ItemTower:
        _need_sources(spec, sources)
        projection = self.projection(spec)
        if spec.get("fusion") in TOKEN_FUSIONS:
            return TOKEN_FUSIONS.get(spec["fusion"])(spec, sources, projection)
        return FeatureTower(sources, spec["n_items"], spec["dim"], projection,
                            spec.get("fusion"), spec.get("whiten", False), fit)

    def check(self, opts: TrainOptions) -> TrainOptions:
        return fill(check_content(opts), **self.defaults)

    def spec(self, opts: TrainOptions, dataset: str) -> dict:
        return content_spec(opts)

    def study_rows(self, mode: str, study: Any) -> list[tuple[str, dict]]:
        if "layers" not in self.defaults:
            return [(mode, {"encoders": [study.encoder]})]
        return [(f"{mode}{n}", {"encoders": [study.encoder], "layers": n}) for n in sorted(set(study.layers))]

    def study_extraction(self, study: Any) -> tuple[None, str]:
        return None, f"features of {study.dataset} by {study.encoder}"

    def dt_layer_keys(self, tower: dict) -> dict[str, str] | None:
        """One unwhitened, unfused group's DT layer: TS's, or TS-DNN's first layer when the residual blocks
        (which start as the identity) follow it; the paper's stack puts a GELU right after it."""
        stack = tower.get("dnn", "paper") if "layers" in tower else None  # runs before --dnn used the paper's
        if tower.get("whiten") or tower.get("fusion") or stack == "paper":
            return None
        return {"weight": "projections.0.0.weight", "bias": "projections.0.0.bias", "missing": "inputs.0.missing"}

    def open(self, ws: Workspace, opts: TrainOptions, dataset: PreparedDataset) -> list[FeatureSource]:
        from extract.cache import FINAL_LAYER

        groups = resolve_groups(dataset.name, opts.encoders, opts.features)
        states = f"--cache-layer {FINAL_LAYER}" if opts.fusion in TOKEN_FUSIONS else ""  # a missing group's fix
        return [open_source(ws, g, dataset.fingerprint, dataset.n_items, states) for g in groups]

    def open_group(self, ws: Workspace, group: str, fingerprint: str, n_items: int) -> FeatureSource:
        return open_source(ws, group, fingerprint, n_items)


def _ts_dnn_projection(spec: dict) -> Callable[[int, int], nn.Module]:
    layers, dropout = int(spec["layers"]), float(spec.get("dropout", 0.1))
    stack = TS_DNN_STACKS.get(spec.get("dnn", "paper"))  # runs from before --dnn used the paper's stack

    def projection(feat_dim: int, dim: int) -> nn.Module:
        return stack(feat_dim, dim, layers, dropout)

    return projection


ITEM_TOWERS.register("id")(IdKind())
ITEM_TOWERS.register("ts")(StoredRowsKind("stored vectors through the DT layer Linear(feat->d)",
                                          lambda spec: dt_layer))
ITEM_TOWERS.register("ts-dnn")(StoredRowsKind(
    "stored vectors through TS-DNN-N", _ts_dnn_projection, TsDnnOptions, {"layers": DEFAULT_TS_DNN_LAYERS, "dnn": DEFAULT_TS_DNN_STACK},
    search_space={"layers": {"type": "int", "low": 1, "high": 10}}, transfer_settings=("layers", "dnn"), lr_donor=0))


def create_item_tower(spec: dict, sources: Sequence[FeatureSource] = (), fit: bool = True) -> ItemTower:
    """Build the tower a spec names (``spec["name"]`` is the mode).

    Args:
        spec: plain data from a run config: ``name``, ``n_items``, ``dim`` and the
            mode's settings (``layers``, ``fusion``, ``whiten``, ``dropout``, ``with_id``).
        sources: opened store groups for content towers.
        fit: compute data-derived state (whitening) from ``sources``; ``load_run``
            passes False and restores that state from the checkpoint instead.

    Example:
        >>> tower = create_item_tower({"name": "id", "n_items": 100, "dim": 64})
        >>> tower(torch.tensor([[1, 2]])).shape
        torch.Size([1, 2, 64])
    """
    tower = ITEM_TOWERS.create(spec["name"], spec, list(sources), fit)
    if spec.get("with_id"):
        if spec["name"] == "id":
            raise UserError(WITH_ID_REFUSAL)
        tower = WithId(tower, spec["with_id"])
    return tower


def list_item_towers(pattern: str = "*") -> list[str]:
    return ITEM_TOWERS.names(pattern)


def list_fusions() -> list[str]:
    """Fusions of two pooled vectors (see :data:`TOKEN_FUSIONS` for those over token states)."""
    return FUSIONS.names()


def list_token_fusions() -> list[str]:
    return TOKEN_FUSIONS.names()
