"""The pytorch engine: runs a TensorRT-LLM checkpoint / engine dir in PyTorch, shaped like TRT-LLM's executor.

    executor = Executor(engine_dir)   # rank 0; ranks > 0 call follow(engine_dir)
    request_id = executor.enqueue(GenerationRequest(input_ids, SamplingConfig(max_new_tokens=16)), callback)
"""

from generator.engine.config import EngineConfig, load_engine_config
from generator.engine.executor import (
    Executor,
    GenerationRequest,
    GenerationResult,
    follow,
    run_prompts,
)
from generator.engine.sampling import SamplingConfig

__all__ = [
    "EngineConfig",
    "Executor",
    "GenerationRequest",
    "GenerationResult",
    "SamplingConfig",
    "follow",
    "load_engine_config",
    "run_prompts",
]
