"""Run Python with the repository as working dir and Triton's interpreter on: how the CPU tests run the Triton
kernels (a snippet with `-c`, or a bench script with its smoke flags)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_interpreted(*argv: str, timeout: int = 300, gpu_if_present: bool = False) -> subprocess.CompletedProcess[str]:
    """`python *argv` in the repository root, TRITON_INTERPRET=1 (unless `gpu_if_present` and CUDA is here: then
    the kernels run natively), output captured as text."""
    import torch

    env = dict(os.environ)
    if not (gpu_if_present and torch.cuda.is_available()):
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=ROOT)
