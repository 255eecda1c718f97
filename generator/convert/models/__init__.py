"""Registry of supported architectures: one `ModelSpec` subclass per file in this package."""

from __future__ import annotations

from typing import Any

from generator.convert.models.base import ModelSpec, ShardLayout, ShardRule
from generator.convert.models.dbrx import DbrxSpec
from generator.convert.models.mpt import MptSpec
from generator.errors import ConfigError

# TensorRT-LLM architecture name -> spec class
SPECS: dict[str, type[ModelSpec]] = {MptSpec.architecture: MptSpec, DbrxSpec.architecture: DbrxSpec}

# HF `model_type` -> spec class
_BY_MODEL_TYPE: dict[str, type[ModelSpec]] = {"mpt": MptSpec, "dbrx": DbrxSpec}


def spec_for(hf_config: dict[str, Any]) -> ModelSpec:
    """The spec of an HF checkpoint, chosen by its `model_type` (or `architectures`)."""
    spec_class = _BY_MODEL_TYPE.get(str(hf_config.get("model_type", "")).lower())
    if spec_class is None:
        for architecture in hf_config.get("architectures") or []:
            spec_class = {name.lower(): cls for name, cls in SPECS.items()}.get(str(architecture).lower())
            if spec_class is not None:
                break
    if spec_class is None:
        raise ConfigError(f"unsupported model: model_type {hf_config.get('model_type')!r}, architectures "
                          f"{hf_config.get('architectures')!r} (supported: mpt, dbrx)")
    try:
        return spec_class(hf_config)
    except (TypeError, ValueError, AttributeError, ZeroDivisionError) as error:
        # a value of the wrong type somewhere in config.json (e.g. a string where a number belongs)
        raise ConfigError(f"malformed {spec_class.architecture} config.json: {error}") from error


def spec_class_for_checkpoint(trtllm_config: dict[str, Any]) -> type[ModelSpec]:
    """The spec class of a TensorRT-LLM checkpoint, by its `architecture`."""
    architecture = str(trtllm_config.get("architecture"))
    for name, cls in SPECS.items():
        if name.lower() == architecture.lower():
            return cls
    raise ConfigError(f"unsupported checkpoint architecture {architecture!r} (supported: {', '.join(SPECS)})")


__all__ = ["SPECS", "ModelSpec", "ShardLayout", "ShardRule", "spec_for", "spec_class_for_checkpoint"]
