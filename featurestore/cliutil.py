"""Conventions shared by the three CLIs: ``--root``, ``--json`` and one-line errors.

A :class:`UserError` raised anywhere below a command becomes one line on stderr
(``error: ...``) and exit status 2, never a traceback: bad input is the user's
to fix, and the message says how.
"""

from __future__ import annotations

import errno
import functools
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable

import click

from featurestore.errors import UserError
from featurestore.registry import suggest
from featurestore.workspace import ROOT_ENV, Workspace, default_root

__all__ = ["SEED", "FloatRange", "UserError", "emit", "json_option", "root_option", "run_cli", "suggest"]


def root_option(func: Callable) -> Callable:
    """Add ``--root DIR`` and pass a :class:`Workspace` as ``ws``."""

    @click.option(
        "--root",
        "root",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help=f"Workspace folder holding datasets, the store and runs "
        f"[default: ${ROOT_ENV}, else ./workspace].",
    )
    @functools.wraps(func)
    def wrapper(*args: Any, root: Path | None, **kwargs: Any) -> Any:
        return func(*args, ws=Workspace(root or default_root()), **kwargs)

    return wrapper


class FloatRange(click.FloatRange):
    """click's FloatRange refusing NaN and infinity too: click lets NaN through every range."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if number is not None and not math.isfinite(number):
            self.fail(f"{value} is not a finite number.", param, ctx)
        return number


# The seeds numpy and torch accept: every --seed of every command is checked against it by click.
SEED = click.IntRange(0, 2**32 - 1)

# Text prints metrics in percent (eval.metrics.percent); JSON, like every saved file, keeps fractions.
json_option = click.option(
    "--json", "as_json", is_flag=True,
    help="Print one JSON object on stdout instead of text (metrics as fractions: HR@10 0.3469 is the text's "
         "34.69%; percent_of_oracle is in percent).",
)


def emit(obj: dict, as_json: bool, text: str | None = None) -> None:
    """Print ``obj`` as one JSON object, or ``text`` (default: key: value lines)."""
    if as_json:
        click.echo(json.dumps(obj, default=_json_default))
    elif text is not None:
        click.echo(text)
    else:
        for key, value in obj.items():
            click.echo(f"{key}: {value}")


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


INTERRUPTED = ("interrupted (Ctrl-C); everything finished so far is kept (prepared datasets, completed store "
               "chunks, trained epochs and their best checkpoint, finished study runs); run the same command "
               "again to resume from there")

# A full disk or a root that cannot be written is the user's to fix, like bad input.
_OS_PROBLEMS = {
    errno.ENOSPC: ("no space left on the device", "free some space and run the same command again"),
    errno.EDQUOT: ("disk quota exceeded", "free some space and run the same command again"),
    errno.EACCES: ("permission denied", "make it writable or choose another --root"),
    errno.EPERM: ("operation not permitted", "make it writable or choose another --root"),
    errno.EROFS: ("read-only file system", "choose another --root"),
    errno.ENOTDIR: ("part of the path is a file, not a folder", "choose another --root"),
}


def os_error_message(err: OSError) -> str | None:
    """One line naming the path, the problem and the fix, for the OS errors in ``_OS_PROBLEMS``."""
    if err.errno not in _OS_PROBLEMS:
        return None
    problem, fix = _OS_PROBLEMS[err.errno]
    return f"{err.filename or 'a file'}: {problem}; {fix} (finished results are kept)"


def run_cli(group: click.Group, prog_name: str) -> None:
    """Run a click group, turning :class:`UserError` (and a full disk or an unwritable
    root) into one line and exit 2."""
    try:
        group.main(prog_name=prog_name, standalone_mode=False)
    except UserError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    except OSError as err:
        message = os_error_message(err)
        if message is None:
            raise
        click.echo(f"error: {message}", err=True)
        sys.exit(2)
    except click.exceptions.Abort as err:
        if isinstance(err.__cause__, KeyboardInterrupt):
            click.echo(f"error: {INTERRUPTED}", err=True)
        else:
            click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except click.exceptions.Exit as err:
        sys.exit(err.exit_code)
