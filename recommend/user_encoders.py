"""User encoders (backbones): a user's item vectors -> one hidden state per position.

One interface for every backbone: ``forward(items (B, L, d), mask (B, L) bool)``
-> ``(B, L, d)``. Sequences are left-padded (``mask`` is False on padding), the state
at position t depends only on items up to t, and the last position is the user
vector. Training predicts the next item from every position, so SASRec's seq2seq
objective and a sequence-to-one model (DSSM: every prefix is one example) share one
training loop.

- ``sasrec`` (Kang & McAuley 2018; the MoRec default): learned positions, causal
  self-attention, post-LN blocks with a 4d GELU feed-forward, as the papers' code.
- ``dssm`` (Huang et al. 2013, as the two-tower baseline of 001): a DNN over the
  mean of the items seen so far; order-free, sequence-to-one.
- ``gru4rec`` (Hidasi et al. 2016): a GRU over the sequence.
- ``nextitnet`` (Yuan et al. 2019): a stack of dilated causal residual CNN blocks.
- ``bert4rec`` (Sun et al. 2019): the one exception to "causal": a bidirectional
  Transformer trained by cloze (``recommend.cloze``). Its ``forward`` is the inference
  form: a learned [MASK] vector is appended after the history and the last state is
  that [MASK]'s output, so the interface (last position = user vector) still holds.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from featurestore.errors import UserError
from featurestore.registry import Registry
from recommend.cloze import cloze_loss
from recommend.options import TrainOptions, fill, option, values_of
from recommend.steps import StepOutput, next_item_step

if TYPE_CHECKING:
    from recommend.losses import Loss
    from recommend.model import Recommender

USER_ENCODERS: Registry[type["UserEncoder"]] = Registry("backbone", plugins=("recommend.plugins",))


@dataclass(frozen=True)
class EncoderConfig:
    """Settings every backbone is built from (each uses the ones it needs)."""

    dim: int = 512
    blocks: int = 2
    heads: int = 2
    dropout: float = 0.1
    max_seq_len: int = 10
    mask_prob: float = 0.2  # bert4rec: share of a row's real items masked in cloze training
    init_std: float | None = None  # sasrec: N(0, init_std) weights as RecBole (None or 0: the papers' Xavier / torch's)
    norm_eps: float | None = None  # sasrec: LayerNorm epsilon (None: torch's 1e-5)
    positions: str | None = None  # sasrec: "from-oldest" counts positions as RecBole (None: from the newest)


class UserEncoder(nn.Module):
    """``(B, L, d)`` item vectors + ``(B, L)`` mask -> ``(B, L, d)`` causal hidden states.

    A registered backbone is a plugin: ``options`` (its option dataclass, if any), ``check``
    and ``spec`` are asked by the trainer, and ``training_step`` is its own.
    """

    options: type | None = None
    cloze = False  # trained by filling in masked items, not next-item prediction

    @classmethod
    def check(cls, opts: TrainOptions) -> TrainOptions:
        """Refuse what this backbone cannot train; return the options with its defaults filled."""
        return opts

    @classmethod
    def spec(cls, opts: TrainOptions) -> dict:
        """The backbone's part of the model spec (plain data, :class:`EncoderConfig` fields)."""
        own = {k: v for k, v in values_of(cls.options, opts).items() if v is not None}
        return {"name": opts.backbone, "blocks": opts.blocks, "heads": opts.heads, "dropout": opts.dropout, **own}

    def training_step(self, model: Recommender, loss: Loss, rows: torch.Tensor) -> StepOutput:
        """One step's loss on training ``rows`` (B, L + 1): next-item prediction at every position."""
        return next_item_step(model, loss, rows)

    def forward(self, items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def initialise(self, model: nn.Module) -> None:
        """Re-initialise what this backbone's options ask for once the whole model is built (default:
        nothing; SASRec's ``--init-std`` also reaches the ID table, as RecBole's ``_init_weights``)."""


def causal_attention_mask(mask: torch.Tensor, heads: int) -> torch.Tensor:
    """Additive attention mask ``(B * heads, L, L)``: each query sees real keys up to itself.

    Every query also sees itself, so a padding row never has all keys masked (which
    would turn its softmax into NaN); padding outputs are ignored downstream.
    """
    length = mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    return _additive_mask(causal & mask[:, None, :], heads)


def bidirectional_attention_mask(mask: torch.Tensor, heads: int) -> torch.Tensor:
    """Additive attention mask ``(B * heads, L, L)``: every query sees every real key.

    Padding is masked as a key only, so no real state reads padding; each query also
    sees itself, so an all-padding row stays finite (as in ``causal_attention_mask``).
    """
    length = mask.shape[1]
    return _additive_mask(mask[:, None, :].expand(-1, length, -1), heads)


def _additive_mask(allowed: torch.Tensor, heads: int) -> torch.Tensor:
    """``allowed`` (B, L, L) plus each query's own key, as the additive ``(B * heads, L, L)``
    mask ``nn.TransformerEncoder`` takes (0 where allowed, -inf elsewhere)."""
    allowed = allowed | torch.eye(allowed.shape[-1], dtype=torch.bool, device=allowed.device)
    additive = torch.zeros(allowed.shape, device=allowed.device).masked_fill(~allowed, float("-inf"))
    return additive.repeat_interleave(heads, dim=0)


TORCH_NORM_EPS = 1e-5  # nn.LayerNorm's default, the MoRec code's
INIT_STD = 0.02  # --init-std's default: RecBole's initializer_range, chosen on issue 28's panel


def normal_init(module: nn.Module, std: float) -> None:
    """RecBole's (and BERT's) ``_init_weights``: every Linear and Embedding weight ~ N(0, std), biases 0,
    LayerNorm 1 and 0; attention's packed input projection (one Linear per q, k, v in RecBole) too."""
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Embedding)):
            nn.init.normal_(sub.weight, 0.0, std)
        elif isinstance(sub, nn.LayerNorm):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.MultiheadAttention) and sub.in_proj_weight is not None:
            nn.init.normal_(sub.in_proj_weight, 0.0, std)
            nn.init.zeros_(sub.in_proj_bias)
        if isinstance(sub, nn.Linear) and sub.bias is not None:
            nn.init.zeros_(sub.bias)


POSITIONS = ("from-newest", "from-oldest")


class _PositionalTransformer(UserEncoder):
    """Post-LN Transformer blocks over item + learned position vectors (SASRec, BERT4Rec).

    Positions count back from the most recent item (0 = the last), so with left
    padding the newest item always carries the same position vector whatever the
    padded length: the same as SASRec's fixed-length left-padded layout. Subclasses
    differ only in the attention mask they pass to ``transform``. SASRec's options
    (``--init-std``, ``--norm-eps``, ``--positions from-oldest``) give RecBole's
    initialisation, LayerNorm epsilon and position count instead.
    """

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.init_std, self.from_oldest = cfg.init_std, cfg.positions == "from-oldest"
        eps = TORCH_NORM_EPS if cfg.norm_eps is None else cfg.norm_eps
        self.positions = nn.Embedding(cfg.max_seq_len, cfg.dim)
        self.norm = nn.LayerNorm(cfg.dim, eps=eps)
        self.dropout = nn.Dropout(cfg.dropout)
        block = nn.TransformerEncoderLayer(
            cfg.dim, cfg.heads, 4 * cfg.dim, cfg.dropout, activation="gelu", batch_first=True, layer_norm_eps=eps
        )
        self.blocks = nn.TransformerEncoder(block, cfg.blocks, enable_nested_tensor=False)
        nn.init.xavier_normal_(self.positions.weight)
        if self.init_std:
            normal_init(self, self.init_std)

    def initialise(self, model: nn.Module) -> None:
        """``--init-std``: the ID table too (``own_table``; RecBole's ``item_embedding``), padding row zero."""
        table = model.item_tower.own_table() if self.init_std else None
        if table is not None:
            with torch.no_grad():
                table.normal_(0.0, self.init_std)
                table[0].zero_()

    @classmethod
    def check(cls, opts: TrainOptions) -> TrainOptions:
        if opts.dim % opts.heads:
            raise UserError(f"--dim {opts.dim} must be divisible by --heads {opts.heads}")
        return opts

    def transform(self, items: torch.Tensor, attention: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states ``(B, L, d)`` of ``items`` under an additive ``attention`` mask (``mask``: the
        real items, which ``--positions from-oldest`` counts from)."""
        length = items.shape[1]
        if self.from_oldest and mask is not None:  # RecBole: 0 = the oldest item of the window
            where = (mask.long().cumsum(dim=1) - 1).clamp_min(0)
        else:  # 0 = the newest item, whatever the padding (the SASRec paper's fixed left-padded layout)
            where = torch.arange(length - 1, -1, -1, device=items.device)
        hidden = self.dropout(self.norm(items + self.positions(where)))
        return self.blocks(hidden, mask=attention)


@dataclass(frozen=True)
class SASRecOptions:
    """RecBole's SASRec, one setting at a time (issue 28; ``bench/parity.py --panel`` measures each)."""

    init_std: float | None = option(
        flag="--init-std", min=0.0, metavar="S", purpose="is an option of --backbone sasrec",
        help=f"sasrec: initialise every weight of the backbone and the ID table (--mode id) from N(0, S), biases 0, "
             f"as RecBole's SASRec (its initializer_range 0.02); 0 = the MoRec code's init (Xavier-normal item "
             f"table and positions, torch's own init for the blocks) [default: {INIT_STD}, which differs from the "
             f"MoRec papers' code: on issue 28's panel of generated worlds, at 3 seeds, it lifted IDRec by "
             f"0.013-0.036 HR@10 to 1.03-1.10x RecBole's SASRec (history excluded; the MoRec init: 0.84-0.99x); "
             f"on the demo, at 3 seeds, IDRec was level, TS gained 0.016 and TS-DNN 0.002, so every mode starts "
             f"the backbone alike "
             f"(BENCHMARKS.md, 'Parity panel')].")
    norm_eps: float | None = option(
        flag="--norm-eps", min=0.0, min_open=True, purpose="is an option of --backbone sasrec",
        help="sasrec: LayerNorm epsilon (RecBole's SASRec: 1e-12) [default: 1e-5, torch's and the MoRec code's].")
    positions: str | None = option(
        flag="--positions", choices=POSITIONS, purpose="is an option of --backbone sasrec",
        help="sasrec: how position vectors count. from-newest = 0 is the newest item whatever the padding (the "
             "SASRec paper's fixed left-padded layout; at inference the last item always has the position it "
             "had as a last training input); from-oldest = 0 is the oldest item in the window (RecBole's "
             "right-padded layout) [default: from-newest].")


@USER_ENCODERS.register("sasrec")
class SASRec(_PositionalTransformer):
    """SASRec as in the MoRec code (causal self-attention, next-item prediction everywhere), initialised
    as RecBole's (``--init-std``'s default, chosen on issue 28's panel) in every mode."""

    options = SASRecOptions

    @classmethod
    def check(cls, opts: TrainOptions) -> TrainOptions:
        return fill(super().check(opts), init_std=INIT_STD)  # recorded in config.json and run names

    def forward(self, items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.transform(items, causal_attention_mask(mask, self.heads), mask)


@dataclass(frozen=True)
class ClozeOptions:
    mask_prob: float | None = option(flag="--mask-prob", min=0.0, max=1.0, min_open=True, max_open=True,
                                     purpose="is the cloze masking share of --backbone bert4rec",
                                     help="bert4rec: share of each sequence's items masked in cloze training "
                                          "[default: 0.2, the BERT4Rec paper's value for MovieLens].")


@USER_ENCODERS.register("bert4rec")
class BERT4Rec(_PositionalTransformer):
    """BERT4Rec (Sun et al. 2019): bidirectional blocks, trained to fill in masked items.

    ``cloze = True`` tells the trainer to train it with ``recommend.cloze`` instead of
    next-item prediction at every position. At inference the [MASK] vector is appended
    after the history and its output is the user vector, so the position table has
    ``max_seq_len + 1`` rows: the [MASK] takes position 0 (the newest), exactly where a
    training row's last item sits when cloze masks it. The output head is BERT's
    transform (Linear, GELU, LayerNorm) that the paper's code puts before the dot product
    with the item table; its per-item output bias is left out because ranking scores
    are plain inner products of user and item vectors.
    """

    cloze = True
    options = ClozeOptions

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__(replace(cfg, max_seq_len=cfg.max_seq_len + 1))
        self.mask_prob = cfg.mask_prob
        self.mask_vector = nn.Parameter(torch.empty(cfg.dim))
        nn.init.normal_(self.mask_vector, std=0.02)  # BERT's initializer range
        self.head = nn.Sequential(nn.Linear(cfg.dim, cfg.dim), nn.GELU(), nn.LayerNorm(cfg.dim))

    def forward(self, items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``(B, L, d)`` states of history + [MASK], first dropped; the last is the [MASK]'s."""
        batch, _, dim = items.shape
        items = torch.cat([items, self.mask_vector.expand(batch, 1, dim)], dim=1)
        mask = nn.functional.pad(mask, (0, 1), value=True)
        masked = torch.zeros_like(mask)
        masked[:, -1] = True
        return self.fill(items, mask, masked)[:, 1:]

    @classmethod
    def check(cls, opts: TrainOptions) -> TrainOptions:
        """Fill ``--mask-prob`` (so config.json records the share the run trained with)."""
        return fill(super().check(opts), mask_prob=EncoderConfig.mask_prob)

    def training_step(self, model: Recommender, loss: Loss, rows: torch.Tensor) -> StepOutput:
        return StepOutput(cloze_loss(model, loss, rows))

    def fill(self, items: torch.Tensor, mask: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """States ``(B, L, d)`` with the ``masked`` (B, L) positions' items replaced by [MASK].

        The cloze step and inference share this one path; a masked position's state is
        what is scored against its true item.
        """
        items = torch.where(masked.unsqueeze(-1), self.mask_vector.to(items.dtype), items)
        return self.head(self.transform(items, bidirectional_attention_mask(mask, self.heads)))


@USER_ENCODERS.register("dssm")
class DSSM(UserEncoder):
    """Sequence-to-one: a DNN over the mean of the user's items so far.

    Position t pools items 1..t, so each prefix is one sequence-to-one example and
    the next-item loss at every position trains the same user tower.
    """

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(cfg.blocks):
            layers += [nn.Linear(cfg.dim, cfg.dim), nn.GELU(), nn.Dropout(cfg.dropout)]
        self.dnn = nn.Sequential(*layers, nn.Linear(cfg.dim, cfg.dim))

    def forward(self, items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        weights = mask.unsqueeze(-1).to(items.dtype)
        totals = (items * weights).cumsum(dim=1)
        counts = weights.cumsum(dim=1).clamp_min(1.0)
        return self.dnn(totals / counts)


def _realign(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate each row of ``x`` (B, L, ...) left by ``shift[b]`` positions."""
    length = x.shape[1]
    index = (torch.arange(length, device=x.device)[None, :] + shift[:, None]) % length
    return torch.gather(x, 1, index.unsqueeze(-1).expand_as(x))


@USER_ENCODERS.register("gru4rec")
class GRU4Rec(UserEncoder):
    """A GRU over the real items only.

    Left padding would otherwise run the GRU over padding first and change its
    state; rows are rotated to right padding, packed, run, and rotated back.
    """

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.dropout = nn.Dropout(cfg.dropout)
        self.gru = nn.GRU(cfg.dim, cfg.dim, num_layers=cfg.blocks, batch_first=True,
                          dropout=cfg.dropout if cfg.blocks > 1 else 0.0)
        self.out = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        length = items.shape[1]
        lengths = mask.sum(dim=1)
        pad = length - lengths
        packed = pack_padded_sequence(_realign(self.dropout(items), pad),
                                      lengths.clamp_min(1).cpu(), batch_first=True,
                                      enforce_sorted=False)
        states, _ = self.gru(packed)
        states, _ = pad_packed_sequence(states, batch_first=True, total_length=length)
        return self.out(_realign(states, -pad))


class _DilatedResidualBlock(nn.Module):
    """NextItNet's residual block: two causal dilated convolutions (d, 2d), LN + ReLU."""

    def __init__(self, dim: int, dilation: int, kernel: int = 3) -> None:
        super().__init__()
        self.pads = ((kernel - 1) * dilation, (kernel - 1) * 2 * dilation)
        self.conv1 = nn.Conv1d(dim, dim, kernel, dilation=dilation)
        self.conv2 = nn.Conv1d(dim, dim, kernel, dilation=2 * dilation)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """``keep`` (B, L, 1) zeroes padding between the convolutions, so a real item
        reads zeros to its left whether they are padding or the causal pad."""
        h = nn.functional.pad(x.transpose(1, 2), (self.pads[0], 0))
        h = torch.relu(self.norm1(self.conv1(h).transpose(1, 2))) * keep
        h = nn.functional.pad(h.transpose(1, 2), (self.pads[1], 0))
        h = torch.relu(self.norm2(self.conv2(h).transpose(1, 2)))
        return (x + h) * keep


@USER_ENCODERS.register("nextitnet")
class NextItNet(UserEncoder):
    """Dilated causal residual CNN; block i uses dilations 4^(i mod 4) and twice that.

    ``blocks=2`` gives dilations (1, 2), (4, 8): a receptive field of 31 items.
    Padding positions are re-zeroed after every convolution so they add nothing.
    """

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            _DilatedResidualBlock(cfg.dim, 4 ** (i % 4)) for i in range(cfg.blocks)
        )

    def forward(self, items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        keep = mask.unsqueeze(-1).to(items.dtype)
        hidden = self.dropout(items) * keep
        for block in self.blocks:
            hidden = block(hidden, keep)
        return hidden


def create_user_encoder(name: str, cfg: EncoderConfig) -> UserEncoder:
    """Build a registered backbone.

    Example:
        >>> enc = create_user_encoder("sasrec", EncoderConfig(dim=32, max_seq_len=10))
        >>> enc(torch.randn(2, 10, 32), torch.ones(2, 10, dtype=torch.bool)).shape
        torch.Size([2, 10, 32])
    """
    return USER_ENCODERS.create(name, cfg)


def list_user_encoders(pattern: str = "*") -> list[str]:
    return USER_ENCODERS.names(pattern)
