"""``--config FILE``: a command's options from a YAML or JSON file, the command line overriding them.

The layered configs of RecBole, MMRec and Ducho are the precedent; the mechanism is
click's own ``default_map``: the file's values become the options' defaults, so
anything typed on the command line wins and every value still goes through the
option's own type and choice checks. Keys are the option names (``batch-size``,
``batch_size`` or ``--batch-size``). A run's own ``config.json`` is accepted too: its
``options`` section is what ``recommend train`` was given, so
``recommend train --config runs/X/config.json --seed 2`` reruns X with one change.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Callable

import click

from featurestore.errors import UserError

# A run's config.json names a few options by their TrainOptions field, not their flag.
RUN_FIELD_ALIASES = {"encoders": "encoder"}
# Not carried over from a run's config.json: a rerun is a new run folder.
RUN_FIELDS_DROPPED = ("run_name",)


def read_config_file(path: Path) -> dict:
    """The mapping in a YAML or JSON file (JSON for ``.json``, else YAML, which also reads JSON)."""
    try:
        text = path.read_text()
    except OSError as err:
        raise UserError(f"--config {path}: cannot read it ({err.strerror})") from err
    import yaml

    as_json = path.suffix.lower() == ".json"
    try:
        data = json.loads(text) if as_json else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as err:
        raise UserError(f"--config {path}: not valid {'JSON' if as_json else 'YAML'} "
                        f"({str(err).splitlines()[0]})") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a mapping of option names to values, got a {type(data).__name__}")
    return data


def _option_names(command: click.Command) -> dict[str, tuple[str, bool]]:
    """Every spelling of each option (flag without dashes, with - or _) -> (parameter name, negated):
    the second flag of an on/off pair (``--live`` of ``--cached/--live``) means the opposite value."""
    names: dict[str, tuple[str, bool]] = {}
    for param in command.params:
        if not isinstance(param, click.Option) or param.name in (None, "config"):
            continue
        flags = [(f, False) for f in (*param.opts, param.name)] + [(f, True) for f in param.secondary_opts]
        for flag, negated in flags:
            key = flag.lstrip("-")
            names[key] = names[key.replace("-", "_")] = (param.name, negated)
    return names


def _value(param: click.Parameter, value: object) -> object:
    """A YAML/JSON list for a comma-separated option (``encoder: [a, b]``) becomes ``a,b``."""
    if isinstance(value, list) and not param.multiple and param.nargs == 1:
        return ",".join(str(v) for v in value)
    return value


def config_defaults(command: click.Command, path: Path) -> dict[str, object]:
    """The ``default_map`` entries a config file gives ``command``; unknown keys are refused."""
    data = read_config_file(path)
    from_run = isinstance(data.get("options"), dict) and "format_version" in data
    if from_run:
        data = {RUN_FIELD_ALIASES.get(k, k): v for k, v in data["options"].items() if k not in RUN_FIELDS_DROPPED}
    names = _option_names(command)
    params = {p.name: p for p in command.params}
    defaults, unknown = {}, []
    for key, value in data.items():
        name, negated = names.get(str(key).lstrip("-"), (None, False))
        if name is None:
            unknown.append(str(key))
        elif value is not None:
            defaults[name] = (not value) if negated else _value(params[name], value)
    if unknown and not from_run:
        hint = difflib.get_close_matches(unknown[0].lstrip("-"), list(names), n=1)
        raise UserError(f"--config {path}: unknown option {unknown[0]!r}"
                        + (f" (did you mean {hint[0]!r}?)" if hint else "")
                        + f"; keys are the options of `{command.name} --help`")
    if unknown:
        click.echo(f"note: --config {path}: ignoring {', '.join(unknown)} (no such option of {command.name})",
                   err=True)
    return defaults


def _load(ctx: click.Context, param: click.Parameter, value: Path | None) -> None:
    if value is not None:
        ctx.default_map = {**(ctx.default_map or {}), **config_defaults(ctx.command, value)}


def config_option(func: Callable) -> Callable:
    """Add ``--config FILE`` to a click command (eager, so its values are defaults before the rest parse)."""
    return click.option(
        "--config", type=click.Path(exists=True, dir_okay=False, path_type=Path), is_eager=True,
        expose_value=False, callback=_load,
        help="YAML or JSON file of option values (keys = option names; the command line overrides them). "
             "A run's config.json works too: rerun it with changes.",
    )(func)
