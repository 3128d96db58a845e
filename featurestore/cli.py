"""``featurestore``: prepare datasets, extract embeddings, and manage the store."""

from __future__ import annotations

import click

from data.cli import dataset
from extract.adapt_cli import adapt
from extract.cli import encoders, extract
from extract.codes_cli import codes
from featurestore import store_cli
from featurestore.cliutil import run_cli


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="morec-store")
def cli() -> None:
    """Stage one of the pipeline: raw datasets -> prepared datasets -> a Zarr feature store.

    \b
    featurestore dataset synth --format hm --out raw/HM
    featurestore dataset prepare --format hm --source raw/HM --name HM
    featurestore extract --dataset HM --encoder efficientnet-lite0
    featurestore ls
    """


cli.add_command(dataset)
cli.add_command(extract)
cli.add_command(encoders)
cli.add_command(adapt)
cli.add_command(codes)
for command in store_cli.COMMANDS:
    cli.add_command(command)


def main() -> None:
    run_cli(cli, "featurestore")


if __name__ == "__main__":
    main()
