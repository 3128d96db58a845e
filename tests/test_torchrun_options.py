"""No option of any command is swallowed by torchrun's own parser.

``torchrun --nproc-per-node N $(which recommend) CMD --opt`` hands ``--opt`` to
torchrun's argparse first, which takes any unambiguous-or-ambiguous abbreviation of its
own options: ``--run`` (of ``--run-path``) stops it with "ambiguous option". The one
option found so, ``--run``, exists only where the run is also the argument ``RUN``.
"""

from __future__ import annotations

import contextlib
import io

import click
from torch.distributed.run import get_args_parser

from eval.cli import cli as eval_cli
from featurestore.cli import cli as featurestore_cli
from recommend.cli import cli as recommend_cli

CLIS = {"recommend": recommend_cli, "featurestore": featurestore_cli, "eval": eval_cli}


def commands(command: click.Command, path: tuple[str, ...] = ()):
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from commands(sub, (*path, name))
    else:
        yield path, command


def passes_through(path: tuple[str, ...], option: str) -> bool:
    args = [*path, option, "value"]
    with contextlib.redirect_stderr(io.StringIO()):
        try:
            parsed = get_args_parser().parse_args(["--nproc-per-node", "2", "script", *args])
        except SystemExit:
            return False
    return parsed.training_script_args == args


def test_every_option_reaches_the_command_under_torchrun():
    trapped = []
    for cli_name, cli in CLIS.items():
        for path, command in commands(cli):
            for param in command.params:
                for option in [*getattr(param, "opts", []), *getattr(param, "secondary_opts", [])]:
                    if option.startswith("-") and not passes_through(path, option):
                        trapped.append((cli_name, path, option, command))
    assert trapped, "the check must see torchrun's --run trap, or it checks nothing"
    for cli_name, path, option, command in trapped:
        positional = [p.name for p in command.params if isinstance(p, click.Argument)]
        assert option == "--run" and positional == ["run_arg"], (
            f"{cli_name} {' '.join(path)} {option} is taken by torchrun's parser; rename it or "
            "accept the value as an argument")
