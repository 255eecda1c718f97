"""Every `gen-repo` flag, its default, type and help, compared with a snapshot: nothing a user types changes by
accident (e.g. when a default moves into a settings dataclass).

After an intended CLI change, rewrite the snapshot and review its diff:

    .venv/bin/python -m tests.test_cli_snapshot
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

SNAPSHOT = Path(__file__).with_name("cli_options.json")


def _plain(value: Any) -> Any:
    """A JSON value for a default (paths as strings, tuples as lists)."""
    return json.loads(json.dumps(value, default=str))


def _type(param: click.Parameter) -> Any:
    kind = param.type
    if isinstance(kind, click.Choice):
        return {"choice": list(kind.choices)}
    if isinstance(kind, click.IntRange):
        return {"int_range": [kind.min, kind.max]}
    if isinstance(kind, click.Path):
        return {"path": {"exists": kind.exists, "file_okay": kind.file_okay, "dir_okay": kind.dir_okay}}
    return kind.name


def _param(param: click.Parameter) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": param.name, "opts": param.opts + param.secondary_opts, "type": _type(param),
                             "default": _plain(param.default), "required": param.required,
                             "multiple": param.multiple, "nargs": param.nargs}
    if isinstance(param, click.Option):
        entry.update(help=param.help, is_flag=param.is_flag, show_default=param.show_default,
                     hidden=param.hidden, metavar=param.metavar)
    return entry


def cli_options() -> dict[str, Any]:
    """Each command's help line and parameters, as the snapshot stores them."""
    from generator.cli import main

    commands: dict[str, click.Command] = {"gen-repo": main}
    commands.update({f"gen-repo {name}": command for name, command in sorted(main.commands.items())})
    return {title: {"help": command.help, "params": [_param(param) for param in command.params]}
            for title, command in commands.items()}


def test_cli_options_match_the_snapshot() -> None:
    expected = json.loads(SNAPSHOT.read_text())
    actual = cli_options()
    assert sorted(actual) == sorted(expected)
    for title in expected:
        assert actual[title] == expected[title], title


if __name__ == "__main__":
    SNAPSHOT.write_text(json.dumps(cli_options(), indent=1) + "\n")
    print(f"wrote {SNAPSHOT}")
