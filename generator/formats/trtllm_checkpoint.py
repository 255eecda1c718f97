"""The TensorRT-LLM checkpoint dir: `config.json` (a `PretrainedConfig`) and one `rank{r}.safetensors` per rank.

An engine dir has the same `config.json` wrapped as `{"pretrained_config": ..., "build_config": ...}` and one
rank file per rank too (`rank{r}.engine` from trtllm-build, `rank{r}.safetensors` from the pytorch build):
`generator.formats.engine_dir` reads those. This module only reads the file and the mapping; what a checkpoint
may hold is checked by its consumer (the pytorch engine by its own parser, the tensorrtllm build as
TensorRT-LLM's `PretrainedConfig` does).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from generator.errors import ConfigError
from generator.formats.mapping import Mapping
from generator.formats.staging import is_staging_dir

CONFIG_FILE = "config.json"
CHECKPOINT_RANK_SUFFIX = ".safetensors"


def read_config_json(directory: Path | str) -> dict[str, Any]:
    """`config.json` of a TensorRT-LLM checkpoint or engine dir, as a JSON object."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{path} not found: pass an engine dir written by `gen-repo build` or a checkpoint dir")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read {path}: {error}") from error
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{path} does not hold a JSON object")
    return data


def is_engine_config(config: dict[str, Any]) -> bool:
    """Whether a `config.json` is an engine dir's (wrapped) rather than a checkpoint's."""
    return "pretrained_config" in config


def read_checkpoint_config(checkpoint_dir: Path | str) -> dict[str, Any]:
    """The `config.json` of a finished TensorRT-LLM checkpoint dir (not an engine dir, not a staging dir)."""
    checkpoint_dir = Path(checkpoint_dir)
    if is_staging_dir(checkpoint_dir):
        raise ConfigError(f"{checkpoint_dir} is the staging dir of an unfinished `gen-repo convert` (interrupted "
                          "or still running); pass the finished checkpoint dir. The next convert into the same "
                          "output removes it.")
    config = read_config_json(checkpoint_dir)
    if is_engine_config(config):
        raise ConfigError(f"{checkpoint_dir} is already an engine dir; pass the TensorRT-LLM checkpoint dir")
    return config


def read_mapping(pretrained: dict[str, Any]) -> Mapping:
    """The `mapping` section of a checkpoint config (TP1/PP1 when absent), checked as TensorRT-LLM's Mapping
    checks it: a written `world_size` must equal tp_size x pp_size."""
    section = pretrained.get("mapping") or {}
    if not isinstance(section, dict):
        raise ConfigError(f"mapping {section!r} is not a JSON object")
    try:
        mapping = Mapping.from_json(dict(section))
        declared = section.get("world_size")
        if declared is not None and int(declared) != mapping.world_size:
            raise ConfigError(f"mapping world_size {declared} is not tp_size {mapping.tensor_parallel_size} x "
                              f"pp_size {mapping.pipeline_parallel_size}")
    except (TypeError, ValueError) as error:
        raise ConfigError(f"mapping {section} has a malformed value: {error}") from None
    return mapping


def rank_file_name(rank: int, suffix: str = CHECKPOINT_RANK_SUFFIX) -> str:
    """`rank{r}.safetensors` (checkpoint, pytorch engine) or `rank{r}.engine` (trtllm-build)."""
    return f"rank{rank}{suffix}"


def rank_files(directory: Path, world_size: int, suffix: str = CHECKPOINT_RANK_SUFFIX) -> list[Path]:
    """The rank files of every rank 0..world_size-1, present or not."""
    return [Path(directory) / rank_file_name(rank, suffix) for rank in range(world_size)]


def missing_rank_files(directory: Path, world_size: int, suffix: str = CHECKPOINT_RANK_SUFFIX) -> list[str]:
    """Names of the rank files absent from `directory`."""
    return [path.name for path in rank_files(directory, world_size, suffix) if not path.is_file()]
