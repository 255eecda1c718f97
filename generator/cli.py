"""The `gen-repo` command line: parses flags, builds each step's settings and calls the step.

Each subcommand lives beside its step's settings; this module holds no logic of its own.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from generator.errors import GenRepoError


class _Group(click.Group):
    """Turns `GenRepoError` into a one-line message and exit code 2, without a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except GenRepoError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(2)


@click.group(cls=_Group, invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "model", metavar="PRESET|DIR", help="Run convert -> build -> render for a preset name "
              "(see `gen-repo models`) or a local Hugging Face checkpoint directory.")
@click.option("--output", "output", type=click.Path(), default="model_repo", show_default=True,
              help="Directory for the whole job's output (checkpoint/, engine/, tokenizer/, triton_repo/).")
@click.pass_context
def main(ctx: click.Context, model: str | None, output: str) -> None:
    """gen-repo: Hugging Face LLM checkpoint -> TensorRT-LLM checkpoint -> engine -> Triton repository."""
    if ctx.invoked_subcommand is not None:
        return
    if model is None:
        click.echo(ctx.get_help())
        return
    raise GenRepoError("the whole-job pipeline is not wired yet")


if __name__ == "__main__":
    main()
