"""`ConvertSettings`: what a conversion needs and the one place its defaults are declared (the CLI flags, the
whole job's `PipelineSettings` and the presets read them from here). Imports nothing heavy, so `gen-repo --help`
stays fast."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ConvertSettings:
    """What `convert_checkpoint` needs; see `gen-repo convert --help` for each field's meaning."""

    model_dir: Path
    output_dir: Path
    dtype: str = "auto"  # float32 | float16 | bfloat16 | auto (the HF checkpoint's dtype)
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    moe_tensor_parallel_size: int | None = None
    moe_expert_parallel_size: int | None = None
    workers: int = 1
    weight_only_precision: str | None = None  # None | "int8" | "int4"
    # Accepted for compatibility and ignored: weight-only checkpoints always hold float weights + quant_algo now.
    weight_only_at_build: bool = False
    int8_kv_cache: bool = False
    calib_text: Path | None = None
    trust_remote_code: bool = False
    progress: bool = True  # tqdm bars on stderr
