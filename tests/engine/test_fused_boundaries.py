"""The layer loop's fused block boundaries (all-reduce + residual add + LayerNorm in one call), wired on CPU.

Its barrier needs peer GPUs (bench/tp_allreduce_gpu.py checks the kernel on a GPU machine against the separate
kernels, and `gen-repo bench` shows equal tokens for every GEN_REPO_TP_ALLREDUCE). Here a stand-in with the
kernel's contract takes its place in the engine, so the wiring is checked: exactly one reduction per block
boundary, whether the fused call takes the message or it is too big and NCCL's path does, and the tokens of
transformers; and the kernel's arithmetic runs under the Triton interpreter at one rank.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from generator.engine import Executor
from generator.engine import model as model_module
from generator.engine.distributed import Communicator
from tests.engine.test_engine_paged import NEW_TOKENS, PROMPTS, engine_with_blocks, run_all
from tests.factories import hf_greedy, make_mpt


class _StandIn:
    """`PeerAllReduceNorm`'s contract at one rank: the sum over ranks of `partial` is `partial` itself."""

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self.calls = 0
        self.roles: list[str] = []

    def fits(self, partial: torch.Tensor) -> bool:
        return partial.dim() == 2 and partial.shape[0] <= self.max_rows

    def __call__(self, role: str, partial: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None,
                 bias: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.calls += 1
        self.roles.append(role)
        total = residual + partial
        normed = F.layer_norm(total, (total.shape[-1],), weight, bias, eps) if weight is not None else None
        return total, normed


def _add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    total = x + residual
    return total, F.layer_norm(total, (total.shape[-1],), weight, bias, eps)


@pytest.mark.parametrize("max_rows", [64, 4])  # every boundary fused; only decode-sized ones (prefill: NCCL's path)
def test_each_block_boundary_reduces_once_and_tokens_match_transformers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, max_rows: int) -> None:
    hf_dir = make_mpt(tmp_path / "hf")
    engine = engine_with_blocks(hf_dir, tmp_path, tokens_per_block=4)
    stand_in = _StandIn(max_rows)
    counts = {"all_reduce": 0, "forward": 0}
    plain_all_reduce, plain_forward = Communicator.tp_all_reduce, model_module.DecoderModel.forward

    def all_reduce(self: Communicator, tensor: torch.Tensor) -> torch.Tensor:
        counts["all_reduce"] += 1
        return plain_all_reduce(self, tensor)

    def forward(self: model_module.DecoderModel, *args: object, **kwargs: object) -> torch.Tensor | None:
        counts["forward"] += 1
        return plain_forward(self, *args, **kwargs)  # type: ignore[arg-type]

    def enable(self: Communicator, dtype: torch.dtype, fused_layers: bool) -> None:
        assert fused_layers
        self.peer_norm = stand_in  # type: ignore[assignment]

    monkeypatch.setattr(model_module, "fused_norm_available", lambda device: True)
    monkeypatch.setattr(model_module, "add_layer_norm", _add_layer_norm)
    monkeypatch.setattr(Communicator, "tp_all_reduce", all_reduce)
    monkeypatch.setattr(model_module.DecoderModel, "forward", forward)
    monkeypatch.setattr(Communicator, "enable_peer_all_reduce", enable)
    with Executor(engine) as executor:
        before = dict(counts, fused=stand_in.calls)  # start-up forwards (warm-up, profiling) count too
        assert run_all(executor, PROMPTS) == hf_greedy(hf_dir, PROMPTS, NEW_TOKENS)
    layers = 2
    forwards = counts["forward"] - before["forward"]
    fused = stand_in.calls - before["fused"]
    reduced = counts["all_reduce"] - before["all_reduce"]
    assert forwards > 0 and fused > 0
    assert fused + reduced == 2 * layers * forwards  # one reduction per boundary, never two
    if max_rows == 4:
        assert reduced > 0  # prefills of more than 4 tokens took the unfused path
    # the roles alternate, attention then mlp, so the kernel's two buffers alternate
    assert set(stand_in.roles[::2]) == {"attention"} and set(stand_in.roles[1::2]) == {"mlp"}


_KERNEL_CHECK = """
import torch
import torch.nn.functional as F
from generator.engine import allreduce_norm as an
torch.manual_seed(0)
rows, width = 5, 40
partial, residual = torch.randn(rows, width), torch.randn(rows, width)
weight, bias = torch.randn(width), torch.randn(width)
data = torch.zeros(2 * 4096)
flags = torch.zeros(an.PROGRAMS, dtype=torch.int32)
data_ptrs = torch.tensor([data.data_ptr()], dtype=torch.int64)
flag_ptrs = torch.tensor([flags.data_ptr()], dtype=torch.int64)
for role_offset, w, b in [(0, weight, bias), (4096, weight, None), (0, None, None)]:
    total = torch.empty_like(residual); out = torch.empty_like(residual)
    an._all_reduce_add_norm_kernel[(min(rows, an.PROGRAMS),)](
        partial, residual, w if w is not None else residual, b if b is not None else residual, total, out,
        data_ptrs, flag_ptrs, role_offset, rows, partial.stride(0), residual.stride(0), total.stride(0), out.stride(0),
        1e-5, RANK=0, WORLD=1, WIDTH=width, BLOCK=64, PROGRAMS=an.PROGRAMS, HAS_NORM=w is not None,
        HAS_BIAS=b is not None)
    assert torch.equal(total, partial + residual), (total - partial - residual).abs().max()
    if w is not None:
        want = F.layer_norm(partial + residual, (width,), w, b, 1e-5)
        assert torch.allclose(out, want, atol=1e-5), (out - want).abs().max()
print("ok")
"""


def test_the_fused_kernel_adds_and_normalizes_as_the_separate_kernels() -> None:
    """The fused kernel's arithmetic, interpreted on CPU at one rank (no peers: the barrier has nobody to wait
    for): rows copied through the buffer, both buffers, with and without a norm and its bias."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    completed = subprocess.run([sys.executable, "-c", _KERNEL_CHECK], capture_output=True, text=True, env=env,
                               timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert completed.returncode == 0 and "ok" in completed.stdout, completed.stdout + completed.stderr
