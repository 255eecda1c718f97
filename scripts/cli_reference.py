"""Regenerate the CLI reference section of README.md from `gen-repo <command> --help`.

    .venv/bin/python scripts/cli_reference.py      (rewrites the text between the two markers)
"""

from __future__ import annotations

import re
from pathlib import Path

from click.testing import CliRunner

from generator.cli import main

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- cli-reference:begin -->", "<!-- cli-reference:end -->"


def reference() -> str:
    """Markdown: the top-level help, then each subcommand's help, in a code block each."""
    runner = CliRunner()
    sections = []
    for command in [None, *sorted(main.commands)]:
        args = ["--help"] if command is None else [command, "--help"]
        output = runner.invoke(main, args, prog_name="gen-repo", terminal_width=110).output.rstrip()
        title = "gen-repo" if command is None else f"gen-repo {command}"
        sections.append(f"### `{title}`\n\n```text\n{output}\n```")
    return "\n\n".join(sections)


def main_() -> None:
    text = README.read_text()
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{README} has no {BEGIN} ... {END} markers")
    README.write_text(pattern.sub(lambda _: f"{BEGIN}\n{reference()}\n{END}", text))


if __name__ == "__main__":
    main_()
