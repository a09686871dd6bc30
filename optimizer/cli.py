"""The ``abopt`` command line: parses arguments and prints; the work lives in the modules."""

from __future__ import annotations

import sys

import click

from optimizer import __version__
from optimizer.errors import UserError
from optimizer.runtime import ensure_fast_blas


class _Group(click.Group):
    """Turns a UserError anywhere below into one line on stderr and exit code 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as error:
            click.echo(f"abopt: error: {error}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="abopt")
def cli() -> None:
    """Optimize abliteration of MLX chat models with Optuna."""


def main() -> None:
    """Console-script entry point."""
    ensure_fast_blas()
    cli()
