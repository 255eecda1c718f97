"""The one reader of Triton `config.pbtxt` files: render, validate, serve, deploy and the preprocessing model
(which looks at its sibling models' engines) all parse them here.

Triton's own schema (`model_config_pb2.ModelConfig`, shipped with tritonclient) parses the text format, so what
parses here is what tritonserver loads. The python models get their own config as JSON from Triton instead
(`triton_models.common.load_model_config`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from generator.errors import ConfigError


class PbtxtError(ConfigError):
    """A config.pbtxt that does not parse as a Triton ModelConfig."""

    def __init__(self, source: str | Path, detail: str) -> None:
        self.detail = detail
        super().__init__(f"{source}: does not parse as a Triton ModelConfig: {detail}")


def parse_model_config(text: str, source: str | Path = "config.pbtxt") -> Any:
    """A `model_config_pb2.ModelConfig` from config.pbtxt text; `PbtxtError` names `source` when it fails."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as error:
        raise PbtxtError(source, str(error)) from None


def read_model_config(path: str | Path) -> Any:
    """The parsed config.pbtxt at `path` (`PbtxtError` when it does not parse)."""
    return parse_model_config(Path(path).read_text(), path)


def parameter(config: Any, key: str) -> str | None:
    """The `parameters` string value of `key` ("" when written empty), None when the key is absent."""
    if key not in config.parameters:
        return None
    return str(config.parameters[key].string_value)


def parameters(config: Any) -> dict[str, str]:
    """Every `parameters` key and its string value."""
    return {key: str(value.string_value) for key, value in config.parameters.items()}


def model_parameter(path: str | Path, key: str) -> str | None:
    """A parameter of the config.pbtxt at `path`; None when the file is missing or unreadable, does not parse,
    or has no such (non-empty) parameter. For best-effort lookups of another model's settings."""
    try:
        value = parameter(read_model_config(path), key)
    except (OSError, UnicodeDecodeError, PbtxtError):
        return None
    return value or None


def instance_counts(text: str) -> list[tuple[int, int]]:
    """(group index, count) for each `count:` written in the instance_group list (proto3 cannot tell an explicit
    0 from an absent count, which means 1)."""
    text = re.sub(r"#[^\n]*", "", text)
    match = re.search(r"\binstance_group\s*:?\s*\[", text)
    if not match:
        return []
    counts, depth, group, index = [], 1, -1, match.end()
    while index < len(text) and depth:
        char = text[index]
        if char in "[{":
            depth += 1
            if depth == 2 and char == "{":
                group += 1
        elif char in "]}":
            depth -= 1
        elif depth == 2:
            found = re.match(r"count\s*:\s*(-?\d+)", text[index:])
            if found and (index == 0 or not (text[index - 1].isalnum() or text[index - 1] == "_")):
                counts.append((group, int(found.group(1))))
                index += found.end()
                continue
        index += 1
    return counts
