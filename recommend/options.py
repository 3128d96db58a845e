"""Training options as data: the shared ones here, every other one owned by the plugin that reads it.

A plugin (a ``--mode``, a ``--backbone``, a ``--loss``, a training feature such as
``--init-from``) declares its options as a frozen dataclass whose fields are made with
:func:`option`: the field's metadata gives the flag, the help text, the valid range and
what the option is for. The ``recommend`` CLI builds its flags from these fields
(:mod:`recommend.cli_options`), the shared checks read the ranges, and an option given
under a run whose plugins do not declare it is refused with what it is for.

:class:`TrainOptions` holds the options every run reads as fields, and the plugins'
options by name in ``given``: ``TrainOptions(dataset="HM", mode="ts-dnn", layers=8)``
works as it always did, ``opts.layers`` reads 8 (or the declaring plugin's unset value),
and a misspelt name is a ``TypeError`` as with any dataclass. Options are never
changed in place: :meth:`TrainOptions.replace` returns a copy, which is how every
plugin's ``check`` returns its filled defaults.

The plugins are found through :mod:`recommend.plugins` (the one list of them), imported
on first use, so this module sits below every plugin and imports none.
"""

from __future__ import annotations

import importlib
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any, Callable, Mapping

from featurestore.errors import UserError


SEED_MAX = 2**32 - 1  # the largest seed numpy accepts


def option(default: Any = None, *, flag: str, help: str, purpose: str = "", min: float | None = None,
           max: float | None = None, min_open: bool = False, max_open: bool = False,
           choices: Any = None, is_flag: bool = False, multiple: bool = False, metavar: str | None = None,
           show_default: bool = False, type: type | None = None) -> Any:
    """A dataclass field that is also a command-line option.

    Args:
        default: the value when not given (``None`` = unset; a plugin's ``check`` fills its
            real default, so config.json records what the run trained with).
        flag: the option's flag, e.g. ``"--layers"``.
        help: the ``--help`` text (or a function making it, for text listing plugins).
        purpose: what it is for, finishing the refusal "FLAG PURPOSE, not --mode M" when it is
            given to a run whose plugins do not declare it.
        min, max, min_open, max_open: the valid range (checked for any given value, shown in ``--help``).
        choices: the valid values, a callable returning them, or a registry (unknown names get its
            suggestions).
        is_flag: a boolean switch.
        multiple: a list, written as comma-separated names on the command line.
        type: the value type on the command line (default: the default's type, else ``str``).
    """
    meta = {"flag": flag, "help": help, "purpose": purpose, "min": min, "max": max, "min_open": min_open,
            "max_open": max_open, "choices": choices, "is_flag": is_flag, "multiple": multiple,
            "metavar": metavar, "show_default": show_default, "type": type}
    if multiple:
        return field(default_factory=list, metadata=meta)
    return field(default=default, metadata=meta)


def unset(f: Field) -> Any:
    """A field's value when not given."""
    return f.default_factory() if f.default is MISSING else f.default


def range_problem(f: Field, value: Any) -> str | None:
    """Why ``value`` is outside the field's range (``"--dim must be >= 1, got 0"``), else None."""
    meta = f.metadata
    low, high = meta.get("min"), meta.get("max")
    if value is None or (low is None and high is None) or isinstance(value, bool):
        return None
    too_low = low is not None and (value <= low if meta["min_open"] else value < low)
    too_high = high is not None and (value >= high if meta["max_open"] else value > high)
    if not (too_low or too_high or value != value):  # value != value: NaN is in no range
        return None
    if low is not None and high is not None:
        wanted = (f"in {'(' if meta['min_open'] else '['}{low:g}, {high:g}{')' if meta['max_open'] else ']'}")
    elif low is not None:
        wanted = f"{'>' if meta['min_open'] else '>='} {low:g}"
    else:
        wanted = f"{'<' if meta['max_open'] else '<='} {high:g}"
    return f"{meta['flag']} must be {wanted}, got {value}"


def choices_of(f: Field) -> list | None:
    """The valid values: a list, a function returning one, or a registry (its names)."""
    choices = f.metadata.get("choices")
    if choices is None:
        return None
    if hasattr(choices, "names"):
        return choices.names()
    return list(choices() if callable(choices) else choices)


def check_fields(option_fields: Mapping[str, Field], values: Mapping[str, Any]) -> None:
    """Refuse any given value outside its field's range or choices."""
    for name, value in values.items():
        f = option_fields[name]
        problem = range_problem(f, value)
        if problem:
            raise UserError(problem)
        known = choices_of(f)
        if hasattr(f.metadata["choices"], "get") and value is not None:
            f.metadata["choices"].get(value)  # the registry's own refusal, with suggestions
        elif known is not None and value is not None and value not in known:
            raise UserError(f"unknown {f.metadata['flag']} {value!r}; known: {', '.join(map(str, known))}")


def registry_names(module: str, registry: str) -> Callable[[], list[str]]:
    """The names of a plugin registry, looked up when asked (this module imports no plugin)."""
    return lambda: getattr(importlib.import_module(module), registry).names()


def summaries(module: str, registry: str, lead: str) -> Callable[[], str]:
    """``--help`` text listing each registered plugin with its ``summary``, made when asked."""

    def text() -> str:
        entries = getattr(importlib.import_module(module), registry)
        return lead + "; ".join(f"{name} = {entries.get(name).summary}" for name in entries.names()) + "."

    return text


@dataclass(frozen=True)
class SharedOptions:
    """The options every run reads, whatever its mode, backbone and loss."""

    dataset: str = option(flag="--dataset", help="Prepared dataset name (under ROOT/datasets) [default: the "
                                                  "only one there].")
    mode: str = option("id", flag="--mode", show_default=True, choices=registry_names("recommend.item_towers", "ITEM_TOWERS"),
                       help=summaries("recommend.item_towers", "ITEM_TOWERS", "Item tower: "))
    backbone: str = option("sasrec", flag="--backbone", help="User encoder over the item sequence.", show_default=True,
                           choices=registry_names("recommend.user_encoders", "USER_ENCODERS"))
    # defaults that differ from the papers' (bce, d 512, lr 1e-4, dropout 0.1): see ``recommend train --help``
    loss: str = option("ce", flag="--loss", show_default=True, choices=registry_names("recommend.losses", "LOSSES"),
                       help=summaries("recommend.losses", "LOSSES", ""))
    dim: int = option(64, flag="--dim", min=1, show_default=True,
                      help="Hidden width d (the MoRec papers: 512; 64 is RecBole's SASRec default and trains "
                           "in minutes on a CPU).")
    blocks: int = option(2, flag="--blocks", min=1, show_default=True,
                         help="Backbone depth (Transformer blocks, GRU layers, CNN residual blocks, DNN layers).")
    heads: int = option(2, flag="--heads", min=1, show_default=True, help="Attention heads (sasrec, bert4rec).")
    # bench/defaults.py: 20-trial searches chose 0.3-0.4 and 2-5x the old lr 1e-3
    dropout: float = option(0.3, flag="--dropout", min=0.0, max=1.0, max_open=True, show_default=True,
                            help="Dropout in the backbone and the TS-DNN layers.")
    lr: float = option(2e-3, flag="--lr", min=0.0, min_open=True, show_default=True,
                       help="AdamW learning rate (the papers: 1e-4 at d 512; at d 64, 1e-4 sits at the popularity "
                            "level for 20+ epochs; 2e-3 reaches 0.99-1.03x the validation HR@10 of a 20-trial "
                            "search on the demo, 1e-3 0.88-0.95x, see BENCHMARKS.md).")
    weight_decay: float = option(0.1, flag="--weight-decay", min=0.0, show_default=True,
                                 help="AdamW weight decay; 0 makes the optimizer Adam exactly (RecBole's: Adam, no "
                                      "decay; 0.1 came out of the searches on the demo, see BENCHMARKS.md).")
    batch_size: int = option(64, flag="--batch-size", min=1, show_default=True, help="Users per step (per process).")
    epochs: int = option(100, flag="--epochs", min=1, show_default=True, help="Most epochs to train.")
    patience: int = option(10, flag="--patience", min=1, show_default=True,
                           help="Stop after this many epochs without a better validation HR@10, once the best is "
                                "clearly (1.1x) above the popularity baseline's.")
    plateau_patience: int = option(30, flag="--plateau-patience", min=1, show_default=True,
                                   help="The patience while validation is still at popularity's level: sequential "
                                        "models learn popularity first and can sit there for tens of epochs before "
                                        "they learn sequences (the papers' code uses one patience; give it here for "
                                        "their behaviour).")
    seed: int = option(42, flag="--seed", min=0, max=SEED_MAX, show_default=True,
                       help="Seed for weights, order, negatives.")
    device: str = option("auto", flag="--device", show_default=True,
                         help="auto (cuda when present), cpu, cuda or cuda:N. Multi-GPU/multi-node: launch with "
                              "`torchrun --nproc-per-node N $(which recommend) train ...`.")
    run_name: str | None = option(flag="--run-name",
                                  help="Run folder name under ROOT/runs [default: DATASET-MODE-BACKBONE-LOSS-TIME].")


SHARED_FIELDS: dict[str, Field] = {f.name: f for f in fields(SharedOptions)}


def plugin_fields() -> dict[str, Field]:
    """Every option a registered plugin declares, by name (:func:`recommend.plugins.option_fields`)."""
    return importlib.import_module("recommend.plugins").option_fields()


@dataclass(frozen=True, init=False)
class TrainOptions(SharedOptions):
    """Everything ``recommend train`` accepts: the shared options as fields, the plugins' by name
    in ``given`` (read as attributes too: ``opts.layers``).

    Immutable: :meth:`replace` (or ``dataclasses.replace`` for shared options) gives a changed
    copy. :meth:`to_dict` is what config.json records under ``options``: every option, unset
    ones at their unset value.
    """

    given: Mapping[str, Any] = field(default_factory=dict)

    def __init__(self, dataset: str = "", given: Mapping[str, Any] | None = None, **values: Any) -> None:
        values = {**(given or {}), **values}
        known = plugin_fields()
        unknown = sorted(set(values) - set(known) - set(SHARED_FIELDS))
        if unknown:
            raise TypeError(f"TrainOptions got unexpected option(s) {', '.join(unknown)}")
        shared = SharedOptions(dataset=dataset, **{k: values.pop(k) for k in list(values) if k in SHARED_FIELDS})
        for name in SHARED_FIELDS:
            object.__setattr__(self, name, getattr(shared, name))
        object.__setattr__(self, "given", {k: v for k, v in values.items() if v != unset(known[k])})

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "given":
            raise AttributeError(name)
        if name in self.given:
            return self.given[name]
        known = plugin_fields()
        if name in known:
            return unset(known[name])
        raise AttributeError(f"TrainOptions has no option {name!r}")

    def replace(self, **changes: Any) -> "TrainOptions":
        """A copy with ``changes`` applied (shared or plugin options alike)."""
        return TrainOptions(**{**self.shared(), **self.given, **changes})

    def shared(self) -> dict:
        return {name: getattr(self, name) for name in SHARED_FIELDS}

    def to_dict(self) -> dict:
        """Every option by name: the recorded form (config.json's ``options``)."""
        return {**self.shared(), **{name: getattr(self, name) for name in plugin_fields()}}


def refuse_foreign_options(opts: TrainOptions, own: set[str], selectors: Mapping[str, str]) -> None:
    """Refuse a given plugin option that none of this run's plugins declares, with what it is for.

    Args:
        own: the option names the run's plugins declare.
        selectors: option name -> the selector of the plugin family that owns it
            (``"--mode ts"``), for the message "FLAG PURPOSE, not --mode ts".
    """
    known = plugin_fields()
    for name in opts.given:
        if name not in own:
            meta = known[name].metadata
            raise UserError(f"{meta['flag']} {meta['purpose']}, not {selectors.get(name, '--mode ' + opts.mode)}")


def fill(opts: TrainOptions, **defaults: Any) -> TrainOptions:
    """``opts`` with each of ``defaults`` filled in where that option is unset (None)."""
    missing = {name: value for name, value in defaults.items() if getattr(opts, name) is None}
    return opts.replace(**missing) if missing else opts


def values_of(options: type | None, opts: TrainOptions) -> dict:
    """The values in ``opts`` of the fields an option dataclass declares (none for None)."""
    return {} if options is None else {f.name: getattr(opts, f.name) for f in fields(options)}
