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

    Parts: the model's children (``item_tower``, ``user_encoder``), the parts the item tower
    names itself (``item_encoder``: a live encoder inside it), and every module tagged with a
    ``cost_part`` (``adapters``, with their count), wherever it sits.

    Example:
        >>> parameter_breakdown(model)["trainable_share"]
        0.027
    """
    whole = _count(model.parameters())
    parts = {name: _count(child.parameters()) for name, child in model.named_children()}
    parts.update({name: _count(part.parameters()) for name, part in model.item_tower.cost_parts().items()})
    tagged: dict[str, list[nn.Module]] = {}
    for module in model.modules():
        if getattr(module, "cost_part", None):
            tagged.setdefault(module.cost_part, []).append(module)
    for name, modules in tagged.items():
        parts[name] = {**_count(p for m in modules for p in m.parameters()), "count": len(modules)}
    share = whole["trainable"] / whole["total"] if whole["total"] else 0.0
    return {"trainable_share": share, **parts}
