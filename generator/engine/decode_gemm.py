"""Float linears at decode batch sizes: our Triton tensor-core kernel (`triton_w8a16.dense_mm`) where
`triton_w8a16.DENSE_CONFIGS` measured it faster than cuBLAS on this GPU, with the MLP's exact GELU in its epilogue
(one kernel instead of two); `F.linear` (and `F.gelu`) everywhere else: CPU, other GPUs, prefill, other shapes."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from generator.engine.weight_only import triton_available
from generator.errors import ConfigError

ENV = "GEN_REPO_DECODE_GEMM"
MODES = ("table", "cublas")  # "cublas": F.linear always (the reference the table was measured against)


class DecodeGemm:
    """`x @ W^T` (optionally GELU of it) for a float weight `[N, K]` and 2-D `x`, by the faster kernel."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        mode = os.environ.get(ENV, MODES[0])
        if mode not in MODES:
            raise ConfigError(f"{ENV} must be one of {', '.join(MODES)}, got {mode!r}")
        self.enabled = (mode == "table" and device.type == "cuda" and dtype == torch.bfloat16
                        and triton_available())
        self.counters: torch.Tensor | None = None
        if self.enabled:  # split-K counters for the widest weight in the table, allocated before any capture
            from generator.engine.triton_w8a16 import DENSE_CONFIGS, new_counters

            self.counters = new_counters(max(outputs for _, outputs, _ in DENSE_CONFIGS), device)

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, gelu: bool = False) -> torch.Tensor:
        if self.enabled and x.dim() == 2 and weight.dtype == x.dtype:
            from generator.engine.triton_w8a16 import dense_config, dense_mm

            # None past MAX_ROWS rows, on other GPUs and for shapes the table does not hold
            config = dense_config(x.shape[0], weight.shape[0], weight.shape[1], x.device, gelu)
            if config is not None:
                return dense_mm(x, weight, config, self.counters, gelu=gelu)
        out = F.linear(x, weight)
        return F.gelu(out) if gelu else out  # exact erf GELU, as HF MPT
