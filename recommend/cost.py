"""What a run's model costs in parameters, broken down by part.

The trainer records the totals (``config["cost"]``: trainable and total parameters)
and, per epoch, seconds, seconds per step and peak memory (``metrics.jsonl``). This
adds where the parameters sit, because the comparison the papers make (001 Table 6,
004 Table 2) is about exactly that: an E2E run trains a few encoder blocks out of a
large frozen encoder, an adapter run about 2-3% of everything.
"""

from __future__ import annotations

from torch import nn


def _count(params) -> dict:
    params = list(params)
    return {"trainable": sum(p.numel() for p in params if p.requires_grad),
            "total": sum(p.numel() for p in params)}


def parameter_breakdown(model: nn.Module) -> dict:
    """Trainable share and ``{"trainable", "total"}`` per part of a Recommender.

    Parts: ``item_tower`` and ``user_encoder`` (the model's children), plus, where
    present, ``item_encoder`` (a live encoder inside the item tower) and ``adapters``.

    Example:
        >>> parameter_breakdown(model)["trainable_share"]
        0.027
    """
    from recommend.adapters import Adapter
    from recommend.e2e import live_towers

    whole = _count(model.parameters())
    parts = {name: _count(child.parameters()) for name, child in model.named_children()}
    towers = live_towers(model)
    if towers:
        parts["item_encoder"] = _count(towers[0].encoder.parameters())
    adapters = [m for m in model.modules() if isinstance(m, Adapter)]
    if adapters:
        parts["adapters"] = {**_count(p for a in adapters for p in a.parameters()), "count": len(adapters)}
    share = whole["trainable"] / whole["total"] if whole["total"] else 0.0
    return {"trainable_share": share, **parts}
