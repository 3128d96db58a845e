"""Training objectives: next-item prediction at every real position.

Every loss has the same two verbs, so the trainer picks one by name and knows
nothing of its insides:

- ``extra_items(rows) -> ids or None``: item ids the loss needs beyond the batch's
  own rows (sampled negatives). The trainer embeds rows and extras in ONE item-tower
  call, so a TS-DNN tower projects each distinct item once per step (the papers'
  code likewise embeds positives and negatives together).
- ``forward(hidden, rows, vectors, extra, extra_vectors) -> scalar``: ``rows`` is the
  left-padded training sequence ``(B, L + 1)`` (inputs = ``rows[:, :-1]``, targets =
  ``rows[:, 1:]``), ``vectors`` its item vectors, ``hidden`` the user encoder's
  states ``(B, L, d)``; a position counts when its input item is real.

Losses:

- ``bce`` (the papers' default, 001 Eq. 1): binary cross-entropy on the positive and
  ONE uniformly sampled negative per position, drawn from the items NOT in the
  user's training sequence (rejection sampling: uniform over that complement).
- ``inbatch``: softmax over the distinct targets of the batch with the
  log-popularity ("logQ") correction of sampled softmax; an item with no training
  interactions counts as 1, so ``log 0`` never happens.
- ``ce``: softmax cross-entropy over the WHOLE catalogue (RecBole's default for
  SASRec; the strongest choice for SASRec per Klenitskiy & Vasilev, RecSys 2023).
  Such a loss sets ``catalogue = True``: instead of sampled extras it receives every
  item's vector, computed by :func:`catalogue_vectors` with an exact gradient and
  bounded memory (chunks through the tower, recomputed in backward); or, with
  ``--catalogue-refresh R`` (the default for modes that run an encoder live), from a
  cache refreshed every R steps, the batch's own items live (:mod:`recommend.catalogue_cache`).
- ``sce``: sampled softmax, ``ce``'s cheap estimate: each position's target against K
  items drawn uniformly for the whole batch (shared negatives, one tower call for all),
  each negative's logit raised by ``log(N / K)`` (the logQ correction), so the
  normaliser estimates the full catalogue's; a draw equal to the target is masked.
- ``gbce``: gSASRec's generalised BCE (Petrov & Macdonald, RecSys 2023) with K
  sampled negatives per position and the calibration ``beta`` that undoes the
  overconfidence negative sampling teaches (``t = 1`` is full CE-like calibration,
  ``t = 0`` is plain BCE).

:func:`embed_step` is the one place that turns a batch into the loss's inputs, so
next-item training and BERT4Rec's cloze step feed every loss alike.
"""

from __future__ import annotations

from dataclasses import dataclass
import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from torch.utils.checkpoint import checkpoint

from featurestore.errors import UserError
from recommend.catalogue_cache import AUTO, CatalogueCache, cached_logsumexp, refresh_schedule
from recommend.chunked_softmax import chunked_logsumexp
from featurestore.registry import Registry
from recommend.options import TrainOptions, fill, option, values_of

LOSSES: Registry[type["Loss"]] = Registry("loss", plugins=("recommend.plugins",))

@dataclass(frozen=True)
class LossContext:
    """Dataset facts a loss may need."""

    n_items: int
    train_counts: np.ndarray  # interactions per item id in the training split, length N + 1
    negatives: int = 1  # gbce: sampled negatives per position; sce: per batch
    gbce_t: float = 0.75  # gbce: calibration t of gSASRec
    catalogue_refresh: int | str | None = None  # ce: steps between cache refreshes, or "auto" (None, 0: exact)


@dataclass(frozen=True)
class NegativesOptions:
    """``--negatives``, of the losses that sample."""

    negatives: int | None = option(flag="--negatives", min=1, purpose="is an option of --loss gbce / sce",
                                   help="gbce: sampled negatives per position, outside the user's sequence "
                                        "[default: 256, gSASRec's]; sce: uniform negatives shared by the batch "
                                        "[default: 1024].")


@dataclass(frozen=True)
class GbceOptions(NegativesOptions):
    """gSASRec's options."""

    gbce_t: float | None = option(flag="--gbce-t", min=0.0, max=1.0, purpose="is an option of --loss gbce",
                                  help="gbce: calibration t in [0, 1]; 0 = plain BCE over K negatives, 1 = fully "
                                       "calibrated [default: 0.75, gSASRec's].")


class Loss(nn.Module):
    """A registered loss is a plugin: ``options`` (its option dataclass) and ``defaults`` (their
    values when unset) are its own; every other loss refuses them."""

    options: type | None = None
    defaults: dict = {}
    catalogue = False  # True: ``extra_vectors`` is every item's vector (N + 1, d), ``extra`` None
    shared_extras = False  # True: ``extra`` is (1, K), the same ids for every row of the batch

    @classmethod
    def check(cls, opts: TrainOptions) -> TrainOptions:
        """Fill this loss's option defaults (so config.json records what the run trained with)."""
        return fill(opts, **cls.defaults)

    @classmethod
    def context_options(cls, opts: TrainOptions) -> dict:
        """The checked options of ``opts`` this loss takes, as :class:`LossContext` fields."""
        return values_of(cls.options, opts)

    def extra_items(self, rows: torch.Tensor) -> torch.Tensor | None:
        """Item ids ``(B, *)`` to embed besides ``rows`` (default: none)."""
        return None

    def epoch_stats(self) -> dict:
        """What this loss did during the epoch, for its line of metrics.jsonl (default: nothing)."""
        return {}

    def forward(self, hidden: torch.Tensor, rows: torch.Tensor, vectors: torch.Tensor,
                extra: torch.Tensor | None, extra_vectors: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


def sample_negatives(sequence: torch.Tensor, n_items: int, per_position: int = 1,
                     max_rounds: int = 1000) -> torch.Tensor:
    """``per_position`` uniform item ids in 1..N per position of ``sequence[:, 1:]``, never in its row.

    Rejection sampling: positions whose draw hits the user's sequence are redrawn,
    which is exactly uniform over the items the user has not interacted with.
    Returns ``(B, (W - 1) * per_position)``, position-major (position t's draws are
    columns ``t * per_position ...``), so one draw per position is ``(B, W - 1)``.
    """
    rows, width = sequence.shape
    draws = torch.randint(1, n_items + 1, (rows, (width - 1) * per_position), device=sequence.device)
    for _ in range(max_rounds):
        clash = (draws.unsqueeze(-1) == sequence.unsqueeze(1)).any(-1)
        if not clash.any():
            return draws
        draws[clash] = torch.randint(1, n_items + 1, (int(clash.sum()),), device=sequence.device)
    raise RuntimeError(f"could not draw negatives outside the sequences in {max_rounds} rounds: "
                       f"the catalogue ({n_items} items) is barely larger than a sequence")


def in_rows(rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``(B, len(ids))`` bool: which of ``ids`` occur in each row of ``rows`` (B, W)."""
    return (ids[None, None, :] == rows[:, :, None]).any(1)


def first_positions(inverse: torch.Tensor, count: int) -> torch.Tensor:
    """For ``unique(x, return_inverse=True)``'s ``inverse``: the first index in ``x`` of each
    of the ``count`` distinct values, so one row per value can be gathered from ``x``'s data."""
    positions = torch.arange(len(inverse), device=inverse.device)
    return torch.full((count,), len(inverse), dtype=positions.dtype,
                      device=inverse.device).scatter_reduce(0, inverse, positions, "amin")


@LOSSES.register("bce")
class SampledBCE(Loss):
    """BCE on (positive, one sampled negative) per position; the two means are summed."""

    summary = "BCE with one sampled negative per position not in the user's sequence (the papers')"

    def __init__(self, ctx: LossContext) -> None:
        super().__init__()
        self.n_items = ctx.n_items

    def extra_items(self, rows):
        return sample_negatives(rows, self.n_items)

    def forward(self, hidden, rows, vectors, extra, extra_vectors):
        valid = rows[:, :-1] > 0
        pos = (hidden * vectors[:, 1:]).sum(-1)[valid]
        neg = (hidden * extra_vectors).sum(-1)[valid]
        return (F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos))
                + F.binary_cross_entropy_with_logits(neg, torch.zeros_like(neg)))


@LOSSES.register("inbatch")
class InBatchSoftmax(Loss):
    """Softmax over the batch's distinct targets, corrected by log popularity.

    Popular items appear as in-batch negatives more often than uniform sampling
    would draw them; subtracting ``log count(i)`` removes that bias. Candidates
    that are in the same user's sequence (other than the true target) are masked,
    so an item is never pushed down for a user who interacted with it. Candidate
    vectors are the targets' own vectors: no extra tower call.
    """

    summary = "in-batch softmax with log-popularity correction"

    def __init__(self, ctx: LossContext) -> None:
        super().__init__()
        counts = torch.as_tensor(np.asarray(ctx.train_counts), dtype=torch.float32)
        self.register_buffer("log_pop", torch.log(counts.clamp_min(1.0)), persistent=False)

    def forward(self, hidden, rows, vectors, extra, extra_vectors):
        valid = rows[:, :-1] > 0
        target_ids, target_vectors = rows[:, 1:][valid], vectors[:, 1:][valid]
        candidates, label = torch.unique(target_ids, return_inverse=True)
        first = first_positions(label, len(candidates))
        logits = hidden[valid] @ target_vectors[first].T - self.log_pop[candidates]
        in_sequence = in_rows(rows, candidates)  # (B, C)
        row = torch.arange(rows.shape[0], device=rows.device)[:, None].expand_as(valid)[valid]
        own = F.one_hot(label, len(candidates)).bool()
        logits = logits.masked_fill(in_sequence[row] & ~own, float("-inf"))
        return F.cross_entropy(logits, label)


LIVE_REFRESH = AUTO  # --catalogue-refresh of the live modes: 0.98x exact ce at 2,895 items, x1.41 inbatch's step at 16,726 (issue 29)


@dataclass(frozen=True)
class CatalogueOptions:
    """``--catalogue-refresh``, of ``ce``."""

    catalogue_refresh: int | str | None = option(
        flag="--catalogue-refresh", type=str, metavar="R|auto", purpose="is an option of --loss ce",
        help=f"ce: score the catalogue against item vectors cached without gradient and refreshed every R "
             f"steps and at each epoch start, the batch's own items computed live with gradient: a step no "
             f"longer runs the whole catalogue through the tower. {AUTO}: refresh once the tower has run as "
             f"many items live as the catalogue holds, so the refresh costs at most a third of the live work "
             f"at any catalogue size (every few steps on a small catalogue). Between refreshes the cached rows "
             f"follow the batch's items' common drift (a linear map and a shift fitted each step), without which "
             f"frequent refreshes collapsed (BENCHMARKS.md, issue 29). 0 = exact (every item through "
             f"the tower with gradient at every step) [default: {LIVE_REFRESH} for the modes that run an "
             f"encoder live (e2e, adapter), 0 for the others].")


@LOSSES.register("ce")
class CatalogueSoftmax(Loss):
    """Softmax cross-entropy of each position's target against all N items.

    ``log sum_i exp(h . v_i)`` is :func:`recommend.chunked_softmax.chunked_logsumexp`:
    item chunks whose logits fit a byte budget, the softmax rebuilt chunk by chunk in
    backward, so memory stays bounded at any catalogue size and the gradient is exact.
    Only positions whose input is real are scored.

    With ``--catalogue-refresh R`` the vectors of the items outside the batch come from a
    :class:`recommend.catalogue_cache.CatalogueCache` refreshed every R steps (the loss
    counts its own calls, one per step) and at each epoch start (the loop puts the
    objective, this loss included, in training mode as each epoch starts). Why a setting
    of ``ce`` and not a loss of its own: it is the same objective over the same catalogue,
    and ``--loss`` is a shared option whose default cannot tell "not given" from "ce"; so
    ``ce``'s own default follows the mode (``TowerKind.runs_encoder_live``: e2e, adapter),
    config.json records it, and ``--catalogue-refresh 0`` forces the exact softmax.
    """

    catalogue = True
    options = CatalogueOptions
    summary = (f"softmax cross-entropy over the whole catalogue (RecBole's SASRec default; memory bounded). "
               f"Exact for id/ts/ts-dnn/side: a step scores every item and a content tower runs over the whole "
               f"catalogue forward and backward (at 87K items on a 2-core CPU x6-13 an inbatch step for IDRec, "
               f"about x55 for TS-DNN-8, see BENCHMARKS.md). For e2e/adapter, whose tower runs the encoder: "
               f"against a cached catalogue {refresh_schedule(LIVE_REFRESH)}, the batch's items live "
               f"(--catalogue-refresh)")

    def __init__(self, ctx: LossContext) -> None:
        super().__init__()
        self.cache = CatalogueCache(ctx.catalogue_refresh) if ctx.catalogue_refresh else None
        self._counted = (0, 0.0)  # the cache's (refreshes, seconds) when the epoch started

    @classmethod
    def check(cls, opts: TrainOptions) -> TrainOptions:
        """A mode that runs an encoder live defaults to the cached catalogue; the others stay exact.
        ``--catalogue-refresh`` arrives as text from the command line: a count of steps or ``auto``."""
        from recommend.item_towers import ITEM_TOWERS

        refresh = opts.catalogue_refresh
        if refresh is None:
            return opts.replace(catalogue_refresh=LIVE_REFRESH) if ITEM_TOWERS.get(opts.mode).runs_encoder_live else opts
        if isinstance(refresh, str) and refresh.strip().isdigit():
            refresh = int(refresh)
        if refresh != AUTO and not (isinstance(refresh, int) and not isinstance(refresh, bool) and refresh >= 0):
            raise UserError(f"--catalogue-refresh {refresh}: give a number of steps >= 0 (0 = exact) or {AUTO}")
        return opts.replace(catalogue_refresh=refresh)

    def train(self, mode: bool = True) -> "CatalogueSoftmax":
        if mode and self.cache is not None:
            self.cache.expire()  # an epoch starts: its first step refreshes the cache
            self._counted = (self.cache.refreshes, self.cache.seconds)
        return super().train(mode)

    def epoch_stats(self) -> dict:
        """The cache's refreshes since the epoch started, and their seconds."""
        if self.cache is None:
            return {}
        refreshes, seconds = self._counted
        return {"catalogue_refreshes": self.cache.refreshes - refreshes,
                "catalogue_refresh_seconds": round(self.cache.seconds - seconds, 3)}

    def embed(self, model: nn.Module, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(vectors of rows, the catalogue table)``: exact, both from one chunked tower pass with
        gradient; cached, ``rows`` through the tower live and the table from the cache."""
        if self.cache is None:
            table = catalogue_vectors(model)
            return table[rows], table
        return model.embed(rows), self.cache.table(model, rows)

    def forward(self, hidden, rows, vectors, extra, extra_vectors):
        valid = rows[:, :-1] > 0
        h = hidden[valid]
        target = (h * vectors[:, 1:][valid]).sum(-1)
        if self.cache is None:
            return (chunked_logsumexp(h, extra_vectors[1:]) - target).mean()
        ids, inverse = torch.unique(rows.reshape(-1), return_inverse=True)
        live = vectors.reshape(-1, vectors.shape[-1])[first_positions(inverse, len(ids))]
        return (cached_logsumexp(h, extra_vectors, ids, live) - target).mean()


@LOSSES.register("sce")
class SampledSoftmax(Loss):
    """Softmax of each position's target against K negatives shared by the batch.

    The K draws are uniform over items 1..N with replacement, so item ``i`` is expected
    ``K / N`` times; scoring a negative as ``h . v - log(K / N)`` (Bengio & Senecal's logQ
    correction) makes ``exp(pos) + sum_k exp(neg_k)`` an unbiased estimate of ``ce``'s
    full normaliser, and the loss approaches ``ce`` as K grows. Unlike ``inbatch``,
    items of the user's own sequence are not masked (``ce`` does not mask them either);
    only a draw that is the position's target is. One draw serves every position, so a
    step embeds K extra items once and multiplies ``(positions, d)`` by ``(d, K)``.
    """

    shared_extras = True
    summary = ("ce's sampled estimate: --negatives K uniform items shared by the batch, logQ-corrected "
               "(x1.2-1.5 inbatch's step at K 1024, 87K items)")
    options = NegativesOptions
    defaults = {"negatives": 1024}  # about a batch's positions (64 x 13): inbatch's number of candidates

    def __init__(self, ctx: LossContext) -> None:
        super().__init__()
        if not 1 <= ctx.negatives < ctx.n_items:
            raise UserError(f"--negatives {ctx.negatives}: the catalogue has {ctx.n_items} items; sample "
                            f"fewer negatives than items, or train on all of them with --loss ce")
        self.n_items, self.k = ctx.n_items, ctx.negatives
        self.log_expected = math.log(ctx.negatives / ctx.n_items)

    def extra_items(self, rows):
        return torch.randint(1, self.n_items + 1, (1, self.k), device=rows.device)

    def forward(self, hidden, rows, vectors, extra, extra_vectors):
        valid = rows[:, :-1] > 0
        h, targets = hidden[valid], rows[:, 1:][valid]
        pos = (h * vectors[:, 1:][valid]).sum(-1, keepdim=True)
        neg = (h @ extra_vectors[0].T - self.log_expected).masked_fill(extra[0] == targets[:, None], float("-inf"))
        return (torch.logsumexp(torch.cat([pos, neg], 1), 1) - pos[:, 0]).mean()


TOWER_CHUNK = 4096  # items per chunk when the catalogue goes through a content tower


def catalogue_vectors(model: nn.Module, chunk: int = TOWER_CHUNK) -> torch.Tensor:
    """Every item's vector ``(N + 1, d)`` with gradient, row 0 (padding) zero.

    An ID table is its own weight. Any other tower runs over the ids ``chunk`` at a
    time, each chunk under activation checkpointing: only the ``(N + 1, d)`` result is
    kept, and a chunk's activations are rebuilt (same dropout draws) during backward,
    so the memory of a deep tower over 87K items is one chunk's, the gradient exact.
    """
    tower = model.item_tower
    weight = tower.own_table()
    if weight is not None:
        return torch.cat([torch.zeros_like(weight[:1]), weight[1:]])
    device = next(model.parameters()).device
    ids = torch.arange(tower.n_items + 1, device=device)
    return torch.cat([checkpoint(model.embed, ids[start:start + chunk], use_reentrant=False)
                      for start in range(0, len(ids), chunk)])


@LOSSES.register("gbce")
class GeneralisedBCE(Loss):
    """gSASRec's gBCE: BCE over the positive and K sampled negatives, the positive's
    probability raised to ``beta``.

    With sampling rate ``alpha = K / (N - 1)``, ``beta = alpha * (t * (1 - 1/alpha) + 1/alpha)``;
    the loss per position is ``-(beta log s(p) + sum_k log(1 - s(n_k))) / (K + 1)``
    (gSASRec Eq. 9-11), averaged over positions. Negatives are uniform over the items
    outside the user's sequence, as for ``bce``.
    """

    options = GbceOptions
    summary = "gSASRec's generalised BCE with --negatives K and calibration --gbce-t"
    defaults = {"negatives": 256, "gbce_t": 0.75}  # gSASRec's K and calibration

    def __init__(self, ctx: LossContext) -> None:
        super().__init__()
        if not 1 <= ctx.negatives < ctx.n_items:
            raise UserError(f"--negatives {ctx.negatives}: the catalogue has {ctx.n_items} items; "
                            f"sample fewer negatives than items, e.g. --negatives {max(1, ctx.n_items // 4)}")
        self.n_items, self.k = ctx.n_items, ctx.negatives
        alpha = ctx.negatives / (ctx.n_items - 1)
        self.beta = alpha * (ctx.gbce_t * (1 - 1 / alpha) + 1 / alpha)

    def extra_items(self, rows):
        return sample_negatives(rows, self.n_items, self.k)

    def forward(self, hidden, rows, vectors, extra, extra_vectors):
        valid = rows[:, :-1] > 0
        b, length = valid.shape
        pos = (hidden * vectors[:, 1:]).sum(-1)[valid]
        neg = torch.einsum("bld,blkd->blk", hidden, extra_vectors.view(b, length, self.k, -1))[valid]
        terms = self.beta * F.softplus(-pos) + F.softplus(neg).sum(-1)
        return terms.mean() / (self.k + 1)


def embed_step(model: nn.Module, loss: Loss, rows: torch.Tensor,
               sample_from: torch.Tensor | None = None):
    """The item vectors one step needs, from one tower call.

    Returns ``(vectors of rows, extra ids, extra vectors)``: the loss's sampled extras
    (drawn against ``sample_from``, default ``rows``; of any shape, e.g. ``sce``'s shared
    ``(1, K)``) embedded together with ``rows``; for a catalogue loss, every item's vector
    (:func:`catalogue_vectors`, or the loss's cached table) and no extra ids.
    """
    if loss.catalogue:
        vectors, table = loss.embed(model, rows)
        return vectors, None, table
    extra = loss.extra_items(rows if sample_from is None else sample_from)
    if extra is None:
        return model.embed(rows), None, None
    vectors = model.embed(torch.cat([rows.flatten(), extra.flatten()]))
    return (vectors[:rows.numel()].reshape(*rows.shape, -1), extra,
            vectors[rows.numel():].reshape(*extra.shape, -1))


def create_loss(name: str, ctx: LossContext) -> Loss:
    """Build a registered loss.

    Example:
        >>> loss = create_loss("bce", LossContext(n_items=100, train_counts=np.ones(101)))
    """
    return LOSSES.create(name, ctx)


def list_losses(pattern: str = "*") -> list[str]:
    return LOSSES.names(pattern)
