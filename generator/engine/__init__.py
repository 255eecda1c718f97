"""The pytorch engine: runs a TensorRT-LLM checkpoint / engine dir in PyTorch, shaped like TRT-LLM's executor.

    executor = Executor(engine_dir)   # rank 0; ranks > 0 call follow(engine_dir)
    request_id = executor.enqueue(GenerationRequest(input_ids, SamplingConfig(max_new_tokens=16)), callback)

`EngineProcess(engine_dir)` is the same executor in a child process. The request types load without torch;
the rest is imported on first use, so a process that only talks to an `EngineProcess` never loads torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from generator.engine.requests import GenerationRequest, GenerationResult, SamplingConfig

if TYPE_CHECKING:
    from generator.engine.config import EngineConfig, load_engine_config
    from generator.engine.executor import Executor, follow, run_prompts
    from generator.engine.process import EngineProcess

#: name -> the module that defines it, imported when the name is first asked for
_LAZY = {
    "EngineConfig": "generator.engine.config",
    "load_engine_config": "generator.engine.config",
    "Executor": "generator.engine.executor",
    "follow": "generator.engine.executor",
    "run_prompts": "generator.engine.executor",
    "EngineProcess": "generator.engine.process",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "EngineConfig",
    "EngineProcess",
    "Executor",
    "GenerationRequest",
    "GenerationResult",
    "SamplingConfig",
    "follow",
    "load_engine_config",
    "run_prompts",
]
