"""PMMRec's auxiliary training objectives (paper 002, Sec. III-C and III-D): ``--objectives``.

Each term is a small ``nn.Module`` in a registry, added to the recommendation loss with
weight 1 as in 002 Eq. 12 (``L = L_DAP + L_NICL + L_NID + L_RCL``; the paper tunes no
weights, so there are no weight options):

- ``nicl`` (Eq. 8-9): next-item enhanced cross-modal contrastive learning. For every
  item of a sequence that has a next item, its text vector's positives are its own image
  vector and both vectors of the next item; the denominator holds its own image vector and
  both modalities of the in-batch negatives (the batch's distinct items that are not in
  this user's sequence, the set of Eq. 5). Symmetric in text and image, l2-normalised
  dot products without temperature, exactly as the equations are written (the next-item
  positives sit in the numerator only). Needs two store groups (``modality_vectors``).
- ``nid`` (Eq. 10): noised item detection. The inputs are corrupted (15% of the real
  positions shuffled among themselves, another 5% replaced by items of the batch) and a
  linear head with ReLU classifies every corrupted position as original / shuffled /
  replaced (cross-entropy over the real positions).
- ``rcl`` (Eq. 11): robustness-aware contrastive learning between a sequence and its
  corrupted copy (the one NID made: "distorted by NID"); negatives are the other
  users' corrupted sequences. "pooling" is read as the mean of the hidden states over
  the real positions; dot products are raw, as written.

NID and RCL use only sequences and the user encoder, so they work with every item tower
and causal backbone; NICL needs the two modalities apart. The corruption draws from
torch's global generator, which the trainer seeds per epoch, so a resumed run draws
exactly what an uninterrupted one does. The terms live on the model as ``objectives``
so their weights (NID's head) are optimised, checkpointed and resumed with it;
``recommender_state`` drops them when a run is loaded for evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from featurestore.errors import UserError
from featurestore.registry import Registry
from recommend.item_towers import FUSIONS, ITEM_TOWERS, TOKEN_FUSIONS, FeatureTower, WithId
from recommend.losses import first_positions, in_rows
from recommend.model import Recommender
from recommend.options import TrainOptions, option
from recommend.user_encoders import USER_ENCODERS

OBJECTIVES: Registry["AuxTerm"] = Registry("objective")
ATTRIBUTE = "objectives"  # the terms' name on the Recommender while it trains
CHECKPOINT_PREFIX = f"{ATTRIBUTE}."
SHUFFLE_RATE = 0.15  # 002 Sec. III-D1
REPLACE_RATE = 0.05
ORIGINAL, SHUFFLED, REPLACED = 0, 1, 2  # NID's classes


@dataclass
class Corruption:
    """A corrupted copy of a batch's input sequences.

    ``items`` (B, L): the corrupted inputs; ``labels`` (B, L): ORIGINAL, SHUFFLED or
    REPLACED per position (ORIGINAL on padding); ``source`` (B, L): the flat index into
    the pool rows ``(B, W)`` of the position whose item each position now holds, so the
    pool's item vectors can be reused instead of calling the item tower again.
    """

    items: torch.Tensor
    labels: torch.Tensor
    source: torch.Tensor


def corrupt(inputs: torch.Tensor, pool: torch.Tensor) -> Corruption:
    """Shuffle 15% and replace another 5% of the real items of each row (002 Sec. III-D1).

    Args:
        inputs: ``(B, L)`` left-padded item ids; must be ``pool[:, :L]``.
        pool: ``(B, W)`` the batch's rows; replacements are drawn from their items.

    Every real position draws u ~ U(0, 1): u < 0.15 picks it for shuffling, 0.15 <= u
    < 0.20 for replacement. One item cannot be shuffled alone, so a row with a single
    pick either gains a second (unpicked) position or loses its pick, with equal odds:
    the expected share stays 15%. The picked items of a row move by a random cyclic
    rotation, a derangement, so (a prepared sequence holds distinct items) every shuffled
    position really changes. A replaced item is drawn uniformly from the batch's distinct
    items outside the user's own row, so it is foreign to the user.
    """
    batch, width = pool.shape
    shuffle, replace = _pick_positions(inputs > 0)
    flat = pool.reshape(-1)
    ids, inverse = torch.unique(flat, return_inverse=True)
    foreign = _foreign(pool, ids)
    replace &= foreign.any(1, keepdim=True)  # a lone user in the batch has nothing foreign
    source = torch.arange(batch, device=pool.device)[:, None] * width + _derangement(shuffle)
    first = first_positions(inverse, len(ids))
    rows = torch.nonzero(replace)[:, 0]
    picks = torch.rand(len(rows), len(ids), device=pool.device).masked_fill(~foreign[rows], -1.0)
    source[replace] = first[picks.argmax(1)]
    labels = torch.full_like(inputs, ORIGINAL)
    labels[shuffle] = SHUFFLED
    labels[replace] = REPLACED
    return Corruption(flat[source], labels, source)


def _pick_positions(real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(shuffle, replace)`` masks over the real positions (see :func:`corrupt`)."""
    batch, length = real.shape
    draw = torch.rand(batch, length, device=real.device)
    shuffle = real & (draw < SHUFFLE_RATE)
    replace = real & (draw >= SHUFFLE_RATE) & (draw < SHUFFLE_RATE + REPLACE_RATE)
    partner_keys = torch.rand(batch, length, device=real.device).masked_fill(~real | shuffle | replace, -1.0)
    paired = ((shuffle.sum(1) == 1) & (torch.rand(batch, device=real.device) < 0.5)
              & (partner_keys >= 0).any(1))
    lone = torch.nonzero(paired)[:, 0]
    shuffle[lone, partner_keys[lone].argmax(1)] = True
    shuffle &= shuffle.sum(1, keepdim=True) >= 2  # the other single picks are dropped
    return shuffle, replace


def _derangement(shuffle: torch.Tensor) -> torch.Tensor:
    """``(B, L)``: the column each position takes its item from; the picked positions of a row,
    in random order, each take the next one's item (a cyclic rotation, no fixed point)."""
    batch, length = shuffle.shape
    count = shuffle.sum(1, keepdim=True)
    order = torch.rand(batch, length, device=shuffle.device).masked_fill(~shuffle, 2.0).argsort(1)
    rank = torch.arange(length, device=shuffle.device).expand(batch, length)
    donor = order.gather(1, (rank + 1) % count.clamp_min(1))
    return torch.empty_like(order).scatter_(1, order, torch.where(rank < count, donor, order))


def _foreign(rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``(B, len(ids))``: which of the (non-padding) ``ids`` are not in each row: in-batch
    negatives in the sense of 002 Eq. 5."""
    return ~in_rows(rows, ids) & (ids > 0)[None, :]


@dataclass
class Step:
    """What the recommendation step computed, shared by the auxiliary terms.

    ``rows`` (B, L + 1) are the training rows, ``vectors`` their item vectors (padding
    zero), ``hidden`` (B, L, d) the user encoder's states over ``rows[:, :-1]``.
    """

    model: Recommender
    rows: torch.Tensor
    vectors: torch.Tensor
    hidden: torch.Tensor
    _corrupted: tuple[Corruption, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def inputs(self) -> torch.Tensor:
        return self.rows[:, :-1]

    def corrupted(self) -> tuple[Corruption, torch.Tensor]:
        """The corrupted inputs and their hidden states, made once per step for NID and RCL.

        Corrupted positions hold items of the batch, so their vectors are gathered from
        ``vectors`` (same dropout draw) rather than computed by a second tower call.
        """
        if self._corrupted is None:
            noise = corrupt(self.inputs, self.rows)
            vectors = self.vectors.reshape(-1, self.vectors.shape[-1])[noise.source]
            self._corrupted = (noise, self.model.encode(vectors, self.inputs > 0))
        return self._corrupted


class AuxTerm(nn.Module):
    """One auxiliary loss, built for a model: ``forward(step) -> scalar``."""

    def __init__(self, model: Recommender) -> None:
        super().__init__()

    def forward(self, step: Step) -> torch.Tensor:
        raise NotImplementedError


def modality_tower(model: Recommender) -> FeatureTower | None:
    """The stored-feature tower of a two-group model (inside ``--with-id`` too), else None."""
    tower = model.item_tower.content if isinstance(model.item_tower, WithId) else model.item_tower
    return tower if isinstance(tower, FeatureTower) and len(tower.inputs) == 2 else None


def nicl_loss(rows: torch.Tensor, ids: torch.Tensor, first: torch.Tensor,
              second: torch.Tensor) -> torch.Tensor:
    """NICL (002 Eq. 8-9) over a batch.

    Args:
        rows: ``(B, W)`` left-padded item ids; every real item but a row's last is an anchor.
        ids: the sorted distinct ids of ``rows`` (``torch.unique(rows)``).
        first, second: ``(len(ids), d)`` each modality's vector of those ids.

    Returns:
        The mean over anchors of ``(L^{1,2} + L^{2,1}) / 2``.
    """
    position = torch.searchsorted(ids, rows)
    a, b = F.normalize(first, dim=-1), F.normalize(second, dim=-1)
    negative = _foreign(rows, ids)
    anchor = rows[:, :-1] > 0
    return (_nicl_direction(a, b, position, negative)[anchor].mean()
            + _nicl_direction(b, a, position, negative)[anchor].mean()) / 2


def _nicl_direction(x: torch.Tensor, y: torch.Tensor, position: torch.Tensor,
                    negative: torch.Tensor) -> torch.Tensor:
    """``L^{X,Y}`` of Eq. 8 at every position ``(B, W - 1)``: anchor x_l; positives y_l,
    y_{l+1}, x_{l+1}; denominator y_l and the negatives' y and x."""
    anchor, same, follow = x[position[:, :-1]], y[position[:, :-1]], position[:, 1:]
    own = (anchor * same).sum(-1)
    positives = torch.stack([own, (anchor * y[follow]).sum(-1), (anchor * x[follow]).sum(-1)], -1)
    hidden_negatives = ~negative[:, None, :]
    others = torch.cat([(anchor @ y.T).masked_fill(hidden_negatives, float("-inf")),
                        (anchor @ x.T).masked_fill(hidden_negatives, float("-inf"))], -1)
    return torch.cat([own[..., None], others], -1).logsumexp(-1) - positives.logsumexp(-1)


def rcl_loss(hidden: torch.Tensor, corrupted: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """RCL (002 Eq. 11): each user's pooled states against every user's corrupted ones.

    Args:
        hidden, corrupted: ``(B, L, d)`` states of the original and corrupted inputs.
        real: ``(B, L)`` True on real positions; pooling is their mean.
    """
    weights = real.unsqueeze(-1).to(hidden.dtype)
    count = weights.sum(1).clamp_min(1.0)
    users, noisy = (hidden * weights).sum(1) / count, (corrupted * weights).sum(1) / count
    return F.cross_entropy(users @ noisy.T, torch.arange(len(users), device=users.device))


@OBJECTIVES.register("nicl")
class NICL(AuxTerm):
    """Next-item enhanced cross-modal contrastive learning between the two store groups."""

    def __init__(self, model: Recommender) -> None:
        super().__init__(model)
        if modality_tower(model) is None:
            raise UserError("objective nicl contrasts the text and image vectors of each item; it needs "
                            "--mode ts or ts-dnn with two groups (--encoder TEXT_ENC,IMAGE_ENC)")

    def forward(self, step: Step) -> torch.Tensor:
        ids = torch.unique(step.rows)
        first, second = modality_tower(step.model).modality_vectors(ids)
        return nicl_loss(step.rows, ids, first, second)


@OBJECTIVES.register("nid")
class NID(AuxTerm):
    """Noised item detection: a 3-way head (original / shuffled / replaced) on the corrupted states."""

    def __init__(self, model: Recommender) -> None:
        super().__init__(model)
        self.head = nn.Linear(model.dim, 3)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``ReLU(h W + b)``, the classifier of Eq. 10."""
        return F.relu(self.head(hidden))

    def forward(self, step: Step) -> torch.Tensor:
        noise, hidden = step.corrupted()
        real = step.inputs > 0
        return F.cross_entropy(self.logits(hidden)[real], noise.labels[real])


@OBJECTIVES.register("rcl")
class RCL(AuxTerm):
    """Robustness-aware contrastive learning between each sequence and its corrupted copy."""

    def forward(self, step: Step) -> torch.Tensor:
        _, corrupted = step.corrupted()
        return rcl_loss(step.hidden, corrupted, step.inputs > 0)


class AuxObjectives(nn.ModuleDict):
    """The chosen terms by name; ``forward(step)`` gives each one's value."""

    def forward(self, step: Step) -> dict[str, torch.Tensor]:
        return {name: term(step) for name, term in self.items()}


@dataclass(frozen=True)
class ObjectivesOptions:
    objectives: list[str] = option(
        flag="--objectives", multiple=True, metavar="NAME[,NAME]", purpose="adds PMMRec's auxiliary losses",
        help="PMMRec's auxiliary losses, added to the recommendation loss with weight 1 (002 Eq. 12) and logged "
             "per term: nicl = next-item enhanced cross-modal contrastive learning (needs two groups: --encoder "
             "TEXT_ENC,IMAGE_ENC), nid = noised item detection, rcl = robustness-aware contrastive learning.")


class ObjectivesFeature:
    """``--objectives``: a training feature every run has (a plugin of recommend.plugins)."""

    options = ObjectivesOptions

    def check(self, opts: TrainOptions) -> TrainOptions:
        check_objectives(opts)
        return opts


def check_objectives(opts: TrainOptions) -> None:
    """Refuse unknown, repeated or unusable ``--objectives`` before anything is loaded."""
    names = opts.objectives
    for name in names:
        OBJECTIVES.get(name)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserError(f"--objectives names {', '.join(repeated)} more than once; list each once")
    if names and getattr(USER_ENCODERS.get(opts.backbone), "cloze", False):
        raise UserError(f"--objectives extend next-item training of a causal backbone; {opts.backbone} trains "
                        "by cloze, which they do not extend: drop --objectives or use --backbone sasrec")
    if "nicl" not in names:
        return
    if len(opts.encoders) + len(opts.features) != 2 or not ITEM_TOWERS.get(opts.mode).reads_store_rows:
        raise UserError("--objectives nicl contrasts the text and image vectors of each item, so it needs "
                        "two store groups: --mode ts|ts-dnn --encoder TEXT_ENC,IMAGE_ENC; drop nicl "
                        "(nid and rcl work on one modality)")
    if opts.fusion in TOKEN_FUSIONS:
        raise UserError(f"--objectives nicl needs each modality's pooled vector before fusion; --fusion "
                        f"{opts.fusion} fuses token states and has none: use --fusion "
                        f"{'|'.join(FUSIONS.names())}")


OBJECTIVES_FEATURE = ObjectivesFeature()


def attach_objectives(model: Recommender, names: list[str]) -> AuxObjectives | None:
    """Build the named terms and register them on ``model`` (as ``model.objectives``).

    Registered there, their weights are optimised, saved in ``model.safetensors`` and
    ``last.safetensors`` and restored on resume by the ordinary model code paths.
    """
    if not names:
        return None
    terms = AuxObjectives({name: OBJECTIVES.create(name, model) for name in names})
    model.add_module(ATTRIBUTE, terms)
    return terms.to(model.device)


def recommender_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint without the objectives' weights: all that ranking needs."""
    return {k: v for k, v in state.items() if not k.startswith(CHECKPOINT_PREFIX)}


def list_objectives(pattern: str = "*") -> list[str]:
    return OBJECTIVES.names(pattern)
