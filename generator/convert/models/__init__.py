"""Registry of supported architectures: one file per architecture in this package, its `ModelSpec` subclass
marked `@register` (see docs/DESIGN.md, "Adding an architecture"). Every module here is imported on first use
of the package, so a new file is all it takes; nothing else lists architectures."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from generator.convert.models.base import (
    ModelSpec,
    ShardLayout,
    ShardRule,
    TinyShape,
    register,
    registered_specs,
    write_tiny_checkpoint,
)
from generator.errors import ConfigError

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")


def _supported() -> str:
    return ", ".join(sorted({t for cls in registered_specs().values() for t in cls.hf_model_types}))


def spec_class(architecture: str) -> type[ModelSpec]:
    """The spec class registered under a TensorRT-LLM (or HF) architecture name, matched case-insensitively."""
    for cls in registered_specs().values():
        if architecture.lower() in {cls.architecture.lower(), *(a.lower() for a in cls.hf_architectures)}:
            return cls
    raise ConfigError(f"unsupported architecture {architecture!r} "
                      f"(supported: {', '.join(registered_specs())})")


def spec_for(hf_config: dict[str, Any]) -> ModelSpec:
    """The spec of an HF checkpoint, chosen by its `model_type` (or `architectures`)."""
    model_type = str(hf_config.get("model_type", "")).lower()
    found = next((cls for cls in registered_specs().values() if model_type in cls.hf_model_types), None)
    for architecture in hf_config.get("architectures") or []:
        if found is not None:
            break
        try:
            found = spec_class(str(architecture))
        except ConfigError:
            continue
    if found is None:
        raise ConfigError(f"unsupported model: model_type {hf_config.get('model_type')!r}, architectures "
                          f"{hf_config.get('architectures')!r} (supported: {_supported()})")
    try:
        return found(hf_config)
    except (TypeError, ValueError, AttributeError, ZeroDivisionError) as error:
        # a value of the wrong type somewhere in config.json (e.g. a string where a number belongs)
        raise ConfigError(f"malformed {found.architecture} config.json: {error}") from error


def spec_class_for_checkpoint(trtllm_config: dict[str, Any]) -> type[ModelSpec]:
    """The spec class of a TensorRT-LLM checkpoint, by its `architecture`."""
    architecture = str(trtllm_config.get("architecture"))
    for name, cls in registered_specs().items():
        if name.lower() == architecture.lower():
            return cls
    raise ConfigError(f"unsupported checkpoint architecture {architecture!r} "
                      f"(supported: {', '.join(registered_specs())})")


__all__ = ["ModelSpec", "ShardLayout", "ShardRule", "TinyShape", "register", "registered_specs", "spec_class",
           "spec_class_for_checkpoint", "spec_for", "write_tiny_checkpoint"]
