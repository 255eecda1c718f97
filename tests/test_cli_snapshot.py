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


def _settings_classes() -> dict[str, list[type]]:
    """Each command and the settings dataclass(es) whose fields its flags set."""
    from generator.bench.eval import EvalSettings
    from generator.build import BuildSettings
    from generator.convert import ConvertSettings
    from generator.pipeline import PipelineSettings
    from generator.run import RunSettings
    from generator.serving.client import InferSettings
    from generator.serving.deploy import DeploySettings
    from generator.serving.openai_server import OpenAISettings
    from generator.serving.render import (
        Batching,
        EngineOverrides,
        RepositoryLayout,
        TensorrtllmOptions,
        TextOptions,
    )
    from generator.serving.serve import ServeSettings

    return {"gen-repo": [PipelineSettings], "convert": [ConvertSettings], "build": [BuildSettings],
            "render": [EngineOverrides, Batching, TextOptions, RepositoryLayout, TensorrtllmOptions],
            "serve": [ServeSettings], "run": [RunSettings], "eval": [EvalSettings], "infer": [InferSettings],
            "openai": [OpenAISettings], "deploy": [DeploySettings]}


#: flags whose default is the flag's own on purpose (not the field's)
_OWN_DEFAULTS = {("convert", "weight_only_precision"),  # the precision --use-weight-only picks; the field's None
                 ("deploy", "base_image")}              # None: DeploySettings' own base image stays


def test_flag_defaults_are_the_settings_defaults() -> None:
    """A flag that sets a settings field has that field's default: the field is where it is declared."""
    from dataclasses import MISSING, fields
    from pathlib import PurePath

    from generator.cli import main

    checked = 0
    for name, classes in _settings_classes().items():
        command = main if name == "gen-repo" else main.commands[name]
        declared = {field.name: field.default for kind in classes for field in fields(kind)
                    if field.default is not MISSING}
        for param in command.params:
            if (not isinstance(param, click.Option) or param.name not in declared
                    or (name, param.name) in _OWN_DEFAULTS):
                continue
            default = declared[param.name]
            expected = str(default) if isinstance(default, PurePath) else default
            actual = param.get_default(click.Context(command))  # a flag's False when it names none
            if param.multiple:  # a repeatable option without a default gives ()
                actual = tuple(actual) if isinstance(actual, (list, tuple)) else ()
            assert actual == expected, (name, param.name, actual, expected)
            checked += 1
    assert checked > 80


def test_the_cli_imports_no_torch() -> None:
    """The flags read their defaults from the settings modules at import time: those stay light, so
    `gen-repo --help` does not load torch (seconds)."""
    import subprocess
    import sys

    code = "import sys, generator.cli; print(sorted({'torch', 'numpy', 'fastapi'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"


if __name__ == "__main__":
    SNAPSHOT.write_text(json.dumps(cli_options(), indent=1) + "\n")
    print(f"wrote {SNAPSHOT}")
