"""``logsumexp(h @ items.T)`` over a whole catalogue, in item chunks, with its exact gradient.

``--loss ce`` needs, for every position's state ``h``, the log of the softmax's
normaliser over all N items. The ``(positions, N)`` logits of a large catalogue
(832 x 87K floats = 290 MB for one SASRec batch) are never held: the forward pass
keeps a running maximum and a running sum per position, one chunk of items at a
time; the backward pass rebuilds each chunk's softmax from the saved result and
turns it straight into the two gradients,

    d lse / d h     = softmax @ items          (positions, d)
    d lse / d items = softmax.T @ h            (N, d)

so a step costs four thin matrix products over the catalogue and never more than
one chunk of logits. Why a hand-written backward rather than activation
checkpointing of ``torch.logsumexp`` per chunk: the checkpointed form recomputes
the chunk, then runs ``logsumexp``'s generic backward over it (which, on CPU,
costs several times the matrix products themselves), and keeps the whole chunk
alive; measured on the 87K bench it was 3x slower (BENCHMARKS.md, issue 13).

The chunk is sized in bytes of logits: on a CPU, small enough that a chunk's
logits stay in cache between the product that writes them and the ``exp`` that
reads them (a thin ``d = 64`` product is memory-bound otherwise); on a GPU, large,
so that a step is a few big kernels.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

CPU_LOGIT_BYTES = 2**22  # 4 MiB: 1260 items x 832 positions; fastest of 0.5-16 MiB measured on the dev CPU
GPU_LOGIT_BYTES = 2**28  # 256 MiB
MIN_CHUNK = 128  # items per chunk at least, however many positions


def logit_budget(device: torch.device) -> int:
    """Bytes one chunk of logits may take on ``device``."""
    return CPU_LOGIT_BYTES if device.type == "cpu" else GPU_LOGIT_BYTES


def chunked_logsumexp(h: torch.Tensor, items: torch.Tensor, budget: int | None = None) -> torch.Tensor:
    """``logsumexp(h @ items.T, dim=1)`` for ``h`` (P, d) and ``items`` (N, d): ``(P,)``.

    At most ``budget`` bytes of logits are alive at once (default :func:`logit_budget`;
    at least ``MIN_CHUNK`` items per chunk). The gradient with respect to both inputs
    is exact (up to float rounding); it is not twice differentiable.

    Example:
        >>> h, items = torch.randn(3, 4), torch.randn(1000, 4)
        >>> torch.allclose(chunked_logsumexp(h, items, budget=3 * 4 * 100), torch.logsumexp(h @ items.T, 1))
        True
    """
    budget = logit_budget(h.device) if budget is None else budget
    chunk = max(MIN_CHUNK, budget // max(1, h.shape[0] * h.element_size()))
    return _ChunkedLogSumExp.apply(h, items, chunk)


def _chunks(items: torch.Tensor, chunk: int):
    for start in range(0, len(items), chunk):
        yield start, items[start:start + chunk]


class _ChunkedLogSumExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, items: torch.Tensor, chunk: int) -> torch.Tensor:
        top = total = None
        for _, part in _chunks(items, chunk):
            logits = h @ part.T
            chunk_top = logits.amax(1)
            if top is None:
                top, total = chunk_top, torch.zeros_like(chunk_top)
            new_top = torch.maximum(top, chunk_top)
            total = total * torch.exp(top - new_top) + logits.sub_(new_top[:, None]).exp_().sum(1)
            top = new_top
        lse = total.log_() + top
        ctx.save_for_backward(h, items, lse)
        ctx.chunk = chunk
        return lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        h, items, lse = ctx.saved_tensors
        want_h, want_items = ctx.needs_input_grad[:2]
        grad_h = torch.zeros_like(h) if want_h else None
        grad_items = torch.empty_like(items) if want_items else None
        for start, part in _chunks(items, ctx.chunk):
            weights = torch.addmm(lse[:, None], h, part.T, alpha=1.0, beta=-1.0)  # h . v - lse
            weights.exp_().mul_(grad[:, None])  # softmax, scaled by the incoming gradient
            if want_h:
                grad_h.addmm_(weights, part)
            if want_items:
                torch.mm(weights.T, h, out=grad_items[start:start + len(part)])
        return grad_h, grad_items, None
