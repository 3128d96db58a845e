"""The one list of ``recommend``'s plugins, and the check that asks each of them.

Like timm's ``models/__init__.py``: importing this module imports every plugin module,
each of which registers its entries in its own registry (modes in
:data:`recommend.item_towers.ITEM_TOWERS`, backbones in
:data:`recommend.user_encoders.USER_ENCODERS`, losses in :data:`recommend.losses.LOSSES`).
Those registries name this module as their plugin list, so a lookup imports it
on first use and nothing ever has to import a plugin only to register it.

A plugin of any family answers the same two things about options:

- ``options``: its option dataclass (fields made with :func:`recommend.options.option`), or None;
- ``check(opts) -> TrainOptions``: refuse what it cannot train, return a copy with its
  defaults filled (never a change in place).

The training features (``--init-from``, ``--objectives``, ``--track``, ``--instances``) are plugins every run has; a
feature may also watch runs (``callbacks(opts) -> [Callback]``: experiment tracking).
"""

from __future__ import annotations

from dataclasses import Field, fields
from typing import Any, Iterator

from featurestore.errors import UserError
from featurestore.workspace import check_name
from recommend import (adapters, e2e, id_init, instances, item_towers, losses, merge_attn, objectives, side,  # noqa: F401
                       sid, tracking, transfer, user_encoders)  # the plugin list: each registers itself on import
from recommend.options import SHARED_FIELDS, TrainOptions, check_fields, range_problem, refuse_foreign_options

FEATURES = (transfer.TRANSFER_FEATURE, objectives.OBJECTIVES_FEATURE, tracking.TRACKING_FEATURE,
            instances.INSTANCES_FEATURE)

# family flag -> (registry, the option of TrainOptions that picks the plugin)
FAMILIES = {"--mode": (item_towers.ITEM_TOWERS, "mode"), "--backbone": (user_encoders.USER_ENCODERS, "backbone"),
            "--loss": (losses.LOSSES, "loss")}


def _options_of(plugin: Any) -> tuple[Field, ...]:
    cls = getattr(plugin, "options", None)
    return fields(cls) if cls is not None else ()


def _family_plugins() -> Iterator[tuple[str, Any]]:
    for flag, (registry, _) in FAMILIES.items():
        for name in registry.names():
            yield flag, registry.get(name)


def option_fields() -> dict[str, Field]:
    """Every plugin's options by name; a name two plugins declare must mean the same option."""
    found: dict[str, Field] = {}
    for plugin in [p for _, p in _family_plugins()] + list(FEATURES):
        for f in _options_of(plugin):
            if f.name in found and found[f.name].metadata != f.metadata:
                raise TypeError(f"option {f.name!r} is declared twice with different meanings")
            found.setdefault(f.name, f)
    return found


def selected(opts: TrainOptions) -> list[Any]:
    """The plugins a run is made of: its mode, backbone and loss, then every training feature."""
    return [registry.get(getattr(opts, attr)) for registry, attr in FAMILIES.values()] + list(FEATURES)


def feature_callbacks(opts: TrainOptions) -> list:
    """The callbacks the training features attach to a run with these (checked) options."""
    return [callback for feature in FEATURES if hasattr(feature, "callbacks") for callback in feature.callbacks(opts)]


def check_options(opts: TrainOptions) -> TrainOptions:
    """Refuse what cannot be trained (each problem with its fix); return the options with every
    plugin's defaults filled in: the finished options a run is built from and records."""
    plugins = selected(opts)
    if opts.run_name is not None:
        check_name("run", opts.run_name)  # refused before any work, not after the model is built
    for f in SHARED_FIELDS.values():
        problem = range_problem(f, getattr(opts, f.name))
        if problem:
            raise UserError(problem)
    own = {f.name for plugin in plugins for f in _options_of(plugin)}
    owners = {f.name: f"{flag} {getattr(opts, FAMILIES[flag][1])}" for flag, plugin in _family_plugins()
              for f in _options_of(plugin)}
    refuse_foreign_options(opts, own, owners)
    check_fields(option_fields(), opts.given)
    return fill_defaults(opts)


def fill_defaults(opts: TrainOptions) -> TrainOptions:
    """``opts`` through each of its plugins' own check: every default a mode, backbone, loss or training
    feature fills in is set (what a run records and what a study's run names hash)."""
    for plugin in selected(opts):
        opts = plugin.check(opts)
    return opts
