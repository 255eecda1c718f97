"""Build an engine dir from a TensorRT-LLM checkpoint.

- `pytorch`: our engine dir (`generator.build.pytorch`).
- `tensorrtllm`: the real `trtllm-build`, through `generator.build.trtllm.build_with_trtllm`.
Settings, limits and checks both share live in `generator.build.settings`.
"""

from __future__ import annotations

from pathlib import Path

from generator.build.settings import DEFAULT_MAX_NUM_TOKENS, BuildSettings, resolve_limits
from generator.errors import ConfigError
from generator.formats.engine_dir import (
    DEFAULT_MAX_INPUT_LEN,
    DEFAULT_MAX_SEQ_LEN,
    ENGINE_BACKENDS,
    EngineLimits,
)

__all__ = ["DEFAULT_MAX_INPUT_LEN", "DEFAULT_MAX_NUM_TOKENS", "DEFAULT_MAX_SEQ_LEN", "ENGINE_BACKENDS",
           "BuildSettings", "EngineLimits", "build_engine", "resolve_limits"]


def build_engine(settings: BuildSettings) -> Path:
    """Build the engine dir with the chosen backend; returns it."""
    if settings.engine_backend not in ENGINE_BACKENDS:
        raise ConfigError(f"engine backend {settings.engine_backend!r} is unknown (use {' or '.join(ENGINE_BACKENDS)})")
    if settings.workers < 1:
        raise ConfigError(f"workers must be at least 1, got {settings.workers}")
    if settings.engine_backend == "tensorrtllm":
        from generator.build.trtllm import build_with_trtllm  # needs nothing from TensorRT-LLM until it runs

        return build_with_trtllm(settings)
    # imported here: the engine code (torch) loads only for a build, never for `gen-repo --help`
    from generator.build.pytorch import build_pytorch_engine

    return build_pytorch_engine(settings)
