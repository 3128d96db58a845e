"""The cached catalogue of ``--loss ce``: a full softmax whose step cost does not grow with the tower's.

Exact ``ce`` runs every item through the item tower, forward and backward, at every
step. For a tower that runs an encoder live (``e2e``, ``adapter``) that is the whole
catalogue through the tuned blocks: the step grows linearly with N (10.6x an
``inbatch`` step at 2,941 items, issue 29). The cached catalogue keeps every item's
vector in a table computed by the tower without gradient, in chunks, and refreshed
every R steps and at each epoch start; each step scores the whole catalogue against
it, while the items the loss was given (the batch's rows, positives included) are
computed live with gradient and replace their cached rows in the logits.

**Drift correction.** The cached rows are stale by up to R steps; the live rows are not. Held
constant, the stale rows leave the model a way to lower the loss that exact ``ce`` does not
have: move every item's vector along a common direction (say, towards the users' mean).
Exact ``ce`` is invariant to such a shift (every logit moves by ``h . c``); the cached loss is
not, because only the live rows (the positives among them) move and the stale normaliser stays
behind. Measured (issue 29, one epoch from a TS start,
refreshed every 10 steps): the share of the mean in the item vectors rose from 0.26 to 0.99,
their norm from 2.5 to 19, the training loss fell below exact's while validation HR@10 fell
from 12.7 % to 0.4 % (docs/assets/issue29-drift.png). So
each step moves the stale rows as the live items moved since the refresh, fitted over them
as one linear map and one shift (:func:`common_drift`), with gradient: the loss sees a common
move of the catalogue as exact ``ce`` sees it, the stale rows' share of the softmax pushes the
live items down as the whole catalogue's would, and the value at R = 1 without dropout is
exact ``ce``'s (the fit is the identity). A shift alone (the mean drift) stopped the collapse
but let the norms grow (R = 10 ended at 5.0 %, ``auto`` 4.4 %, from lower starts); the linear
map keeps them where exact ``ce`` keeps them.

So the user encoder's gradient is that of the full softmax over (at most R steps) stale,
drift-corrected negatives, and the item tower's flows through the live items. Two ideas,
taken and not copied:

- **Cross-batch memory** (XBM, Wang et al., CVPR 2020): embeddings of past batches stay
  useful negatives because, once training has warmed up, an encoder's features drift
  slowly; XBM therefore holds them without gradient and refreshes them as it goes.
  Here the memory is the whole catalogue, so no item is ever missing from the normaliser,
  and the drift is bounded by R steps (a warm start from a TS run starts in the slow phase).
- **Mixed negative sampling** (Yang et al., WWW 2020): in-batch negatives, which carry
  gradient into the item tower, are mixed with negatives from the whole corpus, which
  correct the in-batch popularity bias. Here the in-batch part is live and the corpus
  part is the cache, and the two never count an item twice.

The refresh costs one no-grad pass of the tower over the catalogue (about a third of an
exact step's tower work), once every R steps; the step itself costs the live batch plus
thin matrix products over the cached table (:func:`recommend.chunked_softmax.chunked_logsumexp`).

A fixed R makes that refresh a share of the step that grows with N (every 10 steps is
x2.0 an ``inbatch`` step at 16,726 items). ``auto`` refreshes
instead once the tower has run as many items live as the catalogue holds: the no-grad
pass then costs at most the live forwards it follows, about a third of their forward and
backward, so the step stays within about x1.35 ``inbatch``'s at any N, while a small
catalogue is refreshed every few steps (nearly exact) and a large one less often (its
rows are then at most one catalogue's worth of live items stale, XBM's trade).

Measured (issue 29, BENCHMARKS.md): at 2,895 items, warm-started from a TS run at 12.7 %
validation HR@10, one epoch of exact ``ce`` ended at 9.65 %; the cached catalogue refreshed every
10 steps at 9.34 %, by ``auto`` at 9.45 % (0.98x), every 100 steps at 9.09 %. Without the drift
correction the same R = 10 epoch ended at 0.41 %, below popularity. So the live modes default to
``auto``: at 16,726 items its step is x1.41 an ``inbatch`` step, and it stays bounded at any N.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from recommend.chunked_softmax import chunked_logsumexp


AUTO = "auto"  # refresh once the tower has run a catalogue's worth of items live


def refresh_schedule(every: int | str) -> str:
    """When a cache refreshing by ``every`` refreshes, in words (reports, ``--help``)."""
    when = "once a catalogue's worth of items has run live" if every == AUTO else f"every {every} steps"
    return f"refreshed {when} and at each epoch start"


class CatalogueCache:
    """Every item's vector ``(N + 1, d)``, without gradient, refreshed every ``every`` steps
    (or, with ``every="auto"``, once the live items since the last refresh reach N).

    :meth:`table` is asked once per training step with the ids the step runs live; the first ask
    after :meth:`expire` (an epoch start) and every due ask run the
    tower over the catalogue again. ``refreshes`` and ``seconds`` count those passes and
    their time; ``steps`` counts the asks.
    """

    def __init__(self, every: int | str) -> None:
        if every != AUTO and not (isinstance(every, int) and every >= 1):
            raise ValueError(f"a cached catalogue refreshes every R >= 1 steps or {AUTO!r}, got {every!r}")
        self.every = every
        self.refreshes = 0
        self.steps = 0
        self.seconds = 0.0
        self._table: torch.Tensor | None = None
        self._since = 0  # steps since the last refresh
        self._live = 0  # items run live since the last refresh

    def expire(self) -> None:
        """Refresh on the next step (an epoch starts: the weights moved during validation's wait)."""
        self._table = None

    def _due(self) -> bool:
        if self._table is None:
            return True
        if self.every == AUTO:
            return self._live >= len(self._table) - 1
        return self._since >= self.every

    def table(self, model: nn.Module, rows: torch.Tensor) -> torch.Tensor:
        """The cached vectors for this step, whose ``rows`` run live, refreshed first when due. Only
        ``auto`` counts the live items (a ``unique`` and, on a GPU, a sync a step that R steps skip)."""
        if self._due():
            self._refresh(model)
        self._since += 1
        if self.every == AUTO:
            self._live += int((rows.unique() > 0).sum())
        self.steps += 1
        return self._table

    def _refresh(self, model: nn.Module) -> None:
        """The tower over every item in eval mode (no dropout: each item's own vector, as ranking sees it)."""
        start = time.perf_counter()
        tower = model.item_tower
        training = tower.training
        tower.eval()
        try:
            self._table = model.item_vectors()
        finally:
            tower.train(training)
        self._since = self._live = 0
        self.refreshes += 1
        self.seconds += time.perf_counter() - start


def cached_logsumexp(h: torch.Tensor, table: torch.Tensor, live_ids: torch.Tensor,
                     live: torch.Tensor) -> torch.Tensor:
    """``log sum_i exp(h . v_i)`` over items 1..N: ``v_i`` = ``live``'s row for the (distinct) ``live_ids``,
    the cached ``table`` row moved by the live items' common drift (:func:`common_drift`, ``u_i A + b``) for
    every other item. ``(P,)`` for ``h`` (P, d); id 0 (padding) never counts. The move costs no pass:
    ``log sum exp(h . (u_i A + b)) = log sum exp((h A^T) . u_i) + h . b``.
    """
    real = live_ids > 0
    live_ids, live = live_ids[real], live[real]
    stale = torch.ones(len(table), dtype=torch.bool, device=table.device)
    stale[0] = False
    stale[live_ids] = False
    move, shift = common_drift(table[live_ids], live)
    return torch.logaddexp(chunked_logsumexp(h @ move.T, table[stale]) + h @ shift, torch.logsumexp(h @ live.T, 1))


RIDGE = 1e-3  # x the fit's mean diagonal (summed squared deviation a coordinate): defined with fewer items than d


def common_drift(cached: torch.Tensor, live: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, b)``, the least-squares fit ``live ~ cached @ A + b`` over the live items, ridge-pulled towards
    ``A = I``: how the catalogue moved as a whole since the refresh. A linear map because a step moves
    the DT layer, which moves every item's vector by a linear function of its features; differentiable
    in ``live``, so a common move of the items is paid for by the stale rows' share of the softmax, as
    exact ``ce`` pays for it. ``(d, d)`` and ``(d,)``: a ``d x d`` solve a step, no pass over the items."""
    cached_mean, live_mean = cached.mean(0), live.mean(0)
    x, y = cached - cached_mean, live - live_mean
    gram = x.T @ x
    eye = torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    ridge = RIDGE * gram.diagonal().mean() + torch.finfo(gram.dtype).tiny
    move = eye + torch.linalg.solve(gram + ridge * eye, x.T @ (y - x))
    return move, live_mean - cached_mean @ move
