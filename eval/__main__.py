"""``python -m eval``: the same as the ``eval`` command."""

from eval.cli import main

main()
