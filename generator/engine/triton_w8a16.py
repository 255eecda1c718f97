"""Triton W8A16 kernels for decode on CUDA: `x [M, K] (bf16/fp16/fp32) @ W^T * scale`, W int8 `[N, K]`, M <= 64.

At small M the product is bound by reading W, so the kernels are built to stream W once at full bandwidth:

- W is kept `[N, K]` (K contiguous): each program reads a `BLOCK_N x BLOCK_K` tile as rows of `BLOCK_K`
  contiguous bytes (16-byte vector loads when K is a multiple of 16), converts it in registers and never
  writes it anywhere else.
- Every program covers all M rows (one M tile), so no weight byte is read twice.
- `gemv` (M == 1): float32 products accumulated elementwise over the K loop, reduced across K once at the end.
  `dot` (any M): `acc[BLOCK_N, BLOCK_M] += W_tile @ x_tile^T` on tensor cores, W as the left operand (the
  "swap AB" layout: the small M becomes the MMA's narrow side, padded to 16).
- Split K: when N alone gives too few programs to fill the GPU, the K range is split over `split_k` programs.
  Their float32 partials are reduced by `fixup` (each split stores its partial, the last to arrive at a
  per-N-tile counter sums them, scales and writes the output, then re-arms the counter: one launch) or
  `atomic` (float32 `atomic_add` into a zeroed buffer, then a cast: three launches).
- The per-channel scale is applied once, after the K reduction.

No autotuning and no host syncs: the launch configuration comes from `CONFIGS` (keyed by M bucket, N, K; fill it
from `bench/int8_sweep_gpu.py`) or else `default_config`, so the first call may happen inside a CUDA graph
capture. Imported only when Triton is present.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
import triton
import triton.language as tl

MAX_ROWS = 64
MIN_BLOCK_N = 4  # the smallest BLOCK_N a config may use (dot: 16): the fixup counters are sized by it
_REDUCE_NONE, _REDUCE_ATOMIC, _REDUCE_FIXUP = 0, 1, 2


@dataclass(frozen=True)
class Config:
    """One launch configuration. `kernel`: "gemv" (M == 1 only) or "dot"; `split_k` 0 picks it from the shape;
    `reduce`: "fixup" (one launch) or "atomic" (zeroed float32 buffer + cast) for the K splits."""

    kernel: str = "dot"
    block_n: int = 64
    block_k: int = 128
    split_k: int = 0
    num_warps: int = 4
    num_stages: int = 3
    reduce: str = "fixup"

    def __post_init__(self) -> None:
        if self.kernel not in ("gemv", "dot") or self.reduce not in ("fixup", "atomic"):
            raise ValueError(f"bad W8A16 config {self}")
        smallest_n = MIN_BLOCK_N if self.kernel == "gemv" else 16  # tl.dot: every side >= 16
        if self.block_n < smallest_n or self.block_k < 16 or self.split_k < 0:
            raise ValueError(f"bad W8A16 config {self}: block_n >= {smallest_n}, block_k >= 16, split_k >= 0")

    @property
    def label(self) -> str:
        split = self.split_k or "auto"
        return (f"{self.kernel} n{self.block_n} k{self.block_k} s{split} w{self.num_warps} st{self.num_stages}"
                f"{' atomic' if self.reduce == 'atomic' else ''}")


def m_bucket(rows: int) -> int:
    """The M bucket a config is chosen for: 1, 16, 32 or 64 (the dot kernel's BLOCK_M, at least 16)."""
    return 1 if rows == 1 else max(16, triton.next_power_of_2(rows))


# (M bucket, N, K) -> config, measured by bench/int8_sweep_gpu.py (it prints this table for the shapes it runs);
# (M bucket, 0, 0) is that bucket's config for any other shape (split_k 0 there: chosen per shape); shapes
# matched by neither use default_config
# This table: the fastest of 16 candidates per shape on an H100 80GB HBM3 (2026-11-27, CUDA-graph replays,
# weights rotated past L2); e.g. N 4096 x K 16384 at M 1: 28.9 us against bf16's 49.8 us.
CONFIGS: dict[tuple[int, int, int], Config] = {
    (1, 0, 0): Config('dot', 32, 128, 0, 4, 4, 'fixup'),
    (1, 4096, 4096): Config('gemv', 4, 1024, 1, 4, 1, 'fixup'),
    (1, 4096, 16384): Config('gemv', 8, 512, 2, 4, 2, 'fixup'),
    (1, 12288, 4096): Config('dot', 32, 128, 1, 4, 4, 'fixup'),
    (1, 16384, 4096): Config('gemv', 4, 1024, 1, 4, 1, 'fixup'),
    (16, 0, 0): Config('dot', 32, 128, 0, 4, 4, 'fixup'),
    (16, 4096, 4096): Config('dot', 32, 128, 3, 4, 4, 'fixup'),
    (16, 4096, 16384): Config('dot', 32, 128, 3, 4, 4, 'fixup'),
    (16, 12288, 4096): Config('dot', 32, 128, 1, 4, 4, 'fixup'),
    (16, 16384, 4096): Config('dot', 32, 128, 1, 4, 4, 'fixup'),
    (64, 0, 0): Config('dot', 64, 128, 0, 4, 3, 'fixup'),
    (64, 4096, 4096): Config('dot', 64, 128, 5, 4, 3, 'fixup'),
    (64, 4096, 16384): Config('dot', 64, 128, 5, 4, 3, 'fixup'),
    (64, 12288, 4096): Config('dot', 64, 128, 2, 4, 3, 'fixup'),
    (64, 16384, 4096): Config('dot', 64, 128, 1, 4, 3, 'fixup'),
}


# Float (bf16) weights: (M bucket, N, K) -> (the best launch, cuBLAS time / its time), measured by
# bench/decode_gemm_gpu.py on DENSE_DEVICE (CUDA-graph replays, weights rotated past L2; MPT-7B's linears whole
# and halved for TP2). `dense_config` takes the kernel where it beat cuBLAS by DENSE_MARGIN, or, with the MLP's
# GELU in its epilogue (which saves a kernel of its own), where it came within GELU_MARGIN. Other GPUs, other
# shapes and other row buckets stay with cuBLAS.
DENSE_DEVICE = "NVIDIA H200"
DENSE_MARGIN, GELU_MARGIN = 1.03, 0.95
DENSE_CONFIGS: dict[tuple[int, int, int], tuple[Config, float]] = {
    (16, 4096, 2048): (Config("dot", 64, 128, 1, 4, 5), 1.01),
    (16, 4096, 4096): (Config("dot", 64, 128, 2, 4, 5), 1.12),
    (16, 4096, 8192): (Config("dot", 64, 128, 4, 4, 3), 1.10),
    (16, 4096, 16384): (Config("dot", 64, 128, 2, 4, 5), 1.03),
    (16, 6144, 4096): (Config("dot", 64, 128, 1, 4, 5), 1.05),
    (16, 8192, 4096): (Config("dot", 64, 128, 1, 4, 5), 1.03),
    (16, 12288, 4096): (Config("dot", 64, 128, 1, 4, 4), 1.05),
    (16, 16384, 4096): (Config("dot", 64, 128, 1, 4, 4), 1.01),
    (16, 25216, 4096): (Config("dot", 64, 128, 0, 4, 3), 1.07),
    (16, 50432, 4096): (Config("dot", 64, 128, 1, 4, 3), 1.10),
    (64, 4096, 8192): (Config("dot", 64, 128, 2, 4, 5), 1.07),
    (64, 4096, 16384): (Config("dot", 64, 128, 2, 4, 5), 1.03),
    (64, 6144, 4096): (Config("dot", 64, 128, 1, 4, 5), 1.01),
    (64, 8192, 4096): (Config("dot", 64, 128, 1, 4, 5), 1.02),
    (64, 12288, 4096): (Config("dot", 64, 64, 1, 4, 5), 1.00),
    (64, 16384, 4096): (Config("dot", 128, 128, 1, 8, 3), 0.98),
    (64, 25216, 4096): (Config("dot", 128, 64, 1, 4, 4), 1.00),
    (64, 50432, 4096): (Config("dot", 128, 128, 0, 8, 3), 1.02),
}


@cache
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def dense_config(rows: int, outputs: int, depth: int, device: torch.device, gelu: bool = False) -> Config | None:
    """The launch for a float `[rows, depth] x [outputs, depth]^T` product (plus GELU) where the table says the
    kernel wins on this GPU, else None (cuBLAS). An entry measured at M rows serves M/2 < rows <= M: the kernel
    pads rows to its M tile, while cuBLAS gets faster with fewer."""
    bucket = m_bucket(rows)
    entry = DENSE_CONFIGS.get((bucket, outputs, depth)) if rows <= MAX_ROWS and 2 * rows > bucket else None
    if entry is None or device.type != "cuda" or _device_name(device) != DENSE_DEVICE:
        return None
    config, speedup = entry
    return config if speedup >= (GELU_MARGIN if gelu else DENSE_MARGIN) else None

@cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def default_config(rows: int, outputs: int, depth: int, device: torch.device) -> Config:
    """A shape rule for shapes missing from `CONFIGS` (split_k 0: chosen by `auto_split`)."""
    if rows == 1:
        return Config(kernel="gemv", block_n=32, block_k=256, num_warps=4, num_stages=2)
    return Config(kernel="dot", block_n=64 if rows <= 32 else 128, block_k=128, num_warps=4, num_stages=3)


def pick_config(rows: int, outputs: int, depth: int, device: torch.device) -> Config:
    """The launch configuration for this shape: `CONFIGS` by shape, by M bucket, else `default_config`."""
    bucket = m_bucket(rows)
    config = CONFIGS.get((bucket, outputs, depth)) or CONFIGS.get((bucket, 0, 0))
    if config is None or (config.kernel == "gemv" and rows != 1):
        return default_config(rows, outputs, depth, device)
    return config


def auto_split(n_tiles: int, k_tiles: int, device: torch.device, kernel: str) -> int:
    """Enough programs for a few per SM (the gemv's are small), each with at least two K tiles."""
    wanted = triton.cdiv((4 if kernel == "gemv" else 2) * _sm_count(device), n_tiles)
    return max(1, min(wanted, k_tiles // 2))


_shared_counters: dict[torch.device, torch.Tensor] = {}


def new_counters(outputs: int, device: torch.device) -> torch.Tensor:
    """Zeroed fixup counters for a weight of `outputs` rows (one per N tile of the smallest BLOCK_N); the
    kernel re-arms each counter it uses, so they stay zero between calls. Allocate at load, not under capture."""
    return torch.zeros(triton.cdiv(outputs, MIN_BLOCK_N), dtype=torch.int32, device=device)


def _counters_for(device: torch.device, tiles: int) -> torch.Tensor:
    """Counters shared by callers that bring none (benchmarks, tests): fine while calls on a device are
    serialized on one stream, which is how the engine runs; WeightOnlyLinear brings its own."""
    counters = _shared_counters.get(device)
    if counters is None or counters.numel() < tiles:
        counters = _shared_counters[device] = torch.zeros(max(tiles, 4096), dtype=torch.int32, device=device)
    return counters


@triton.jit
def _finish(value, dtype, ACTIVATION: tl.constexpr):
    """The product rounded to the output dtype; with ACTIVATION 1, then exact (erf) GELU computed in float32 from
    that rounded value and rounded again: what `F.gelu(F.linear(x, w))` does in two kernels."""
    out = value.to(dtype)
    if ACTIVATION == 1:
        x = out.to(tl.float32)
        out = (0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))).to(dtype)
    return out


@triton.jit
def _epilogue(acc, scale, out_ptrs, ws_ptrs, ws_step, cnt_ptr, mask, pid_k, splits, REDUCE: tl.constexpr,
              ACTIVATION: tl.constexpr = 0):
    """Scale and store `acc` (this program's float32 sum over its K range), reducing across the K splits (an
    ACTIVATION needs REDUCE 0 or 2: the atomic path's cast happens outside the kernel)."""
    if REDUCE == 0:
        tl.store(out_ptrs, _finish(acc * scale, out_ptrs.dtype.element_ty, ACTIVATION), mask=mask)
    elif REDUCE == 1:  # ws: a zeroed float32 [M, N] (scaling each partial is the same as scaling their sum)
        tl.atomic_add(ws_ptrs, acc * scale, mask=mask)
    else:  # ws: float32 [splits, M, N]; the last split to arrive at this N tile's counter sums them
        tl.store(ws_ptrs + pid_k * ws_step, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial is written before the (release) arrival below
        arrived = tl.atomic_add(cnt_ptr, 1, sem="acq_rel")
        if arrived == splits - 1:
            total = tl.zeros_like(acc)
            for split in range(0, splits):  # .cg: from L2, never a stale L1 line of another SM's partial
                total += tl.load(ws_ptrs + split * ws_step, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(out_ptrs, _finish(total * scale, out_ptrs.dtype.element_ty, ACTIVATION), mask=mask)
            tl.atomic_xchg(cnt_ptr, 0)  # re-armed for the next call (or CUDA graph replay)


@triton.jit(do_not_specialize=["tiles_per_split", "k_tiles"])
def _gemv_kernel(x_ptr, w_ptr, s_ptr, out_ptr, ws_ptr, cnt_ptr, N, K, stride_wn, k_tiles, tiles_per_split,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, REDUCE: tl.constexpr):
    """M == 1: out[n] = sum_k x[k] * W[n, k] * scale[n] for this program's N tile and K range."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n0 = pid_n * BLOCK_N
    rows = tl.minimum(tl.arange(0, BLOCK_N), N - 1 - n0)  # the tail tile re-reads row N-1: unmasked loads
    offs_k = tl.arange(0, BLOCK_K)
    t0 = pid_k * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, k_tiles)
    w_ptrs = w_ptr + n0.to(tl.int64) * stride_wn + rows[:, None] * stride_wn + (t0 * BLOCK_K + offs_k)[None, :]
    x_ptrs = x_ptr + t0 * BLOCK_K + offs_k
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for t in range(t0, t1):
        if EVEN_K:
            w = tl.load(w_ptrs)
            x = tl.load(x_ptrs)
        else:
            in_k = t * BLOCK_K + offs_k < K
            w = tl.load(w_ptrs, mask=in_k[None, :], other=0)
            x = tl.load(x_ptrs, mask=in_k, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    offs_n = n0 + tl.arange(0, BLOCK_N)
    in_n = offs_n < N
    scale = tl.load(s_ptr + offs_n, mask=in_n, other=0.0).to(tl.float32)
    _epilogue(tl.sum(acc, axis=1), scale, out_ptr + offs_n, ws_ptr + offs_n, N, cnt_ptr + pid_n, in_n, pid_k,
              tl.num_programs(1), REDUCE)


@triton.jit(do_not_specialize=["M", "tiles_per_split", "k_tiles"])
def _dot_kernel(x_ptr, w_ptr, s_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, stride_xm, stride_wn, k_tiles,
                tiles_per_split, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                EVEN_K: tl.constexpr, REDUCE: tl.constexpr, PRECISION: tl.constexpr, HAS_SCALE: tl.constexpr,
                ACTIVATION: tl.constexpr):
    """acc[n, m] = sum_k W[n, k] * x[m, k] over this program's N tile and K range, all M rows at once (W int8
    with a per-row scale, or W float and no scale)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n0 = pid_n * BLOCK_N
    rows = tl.minimum(tl.arange(0, BLOCK_N), N - 1 - n0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    in_m = offs_m < M
    t0 = pid_k * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, k_tiles)
    w_ptrs = w_ptr + n0.to(tl.int64) * stride_wn + rows[:, None] * stride_wn + (t0 * BLOCK_K + offs_k)[None, :]
    x_ptrs = x_ptr + offs_m[None, :] * stride_xm + (t0 * BLOCK_K + offs_k)[:, None]  # x^T tile [BLOCK_K, BLOCK_M]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for t in range(t0, t1):
        if EVEN_K:
            w = tl.load(w_ptrs)
            x = tl.load(x_ptrs, mask=in_m[None, :], other=0.0)
        else:
            in_k = t * BLOCK_K + offs_k < K
            w = tl.load(w_ptrs, mask=in_k[None, :], other=0)
            x = tl.load(x_ptrs, mask=in_m[None, :] & in_k[:, None], other=0.0)
        acc = tl.dot(w.to(x.dtype), x, acc, input_precision=PRECISION)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    offs_n = n0 + tl.arange(0, BLOCK_N)
    in_n = offs_n < N
    if HAS_SCALE:
        scale = tl.load(s_ptr + offs_n, mask=in_n, other=0.0).to(tl.float32)[:, None]
    else:
        scale = tl.full((BLOCK_N, 1), 1.0, tl.float32)
    offsets = offs_m[None, :] * N + offs_n[:, None]
    _epilogue(acc, scale, out_ptr + offsets, ws_ptr + offsets, M * N, cnt_ptr + pid_n, in_n[:, None] & in_m[None, :],
              pid_k, tl.num_programs(1), REDUCE, ACTIVATION)


def w8a16_mm(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, config: Config | None = None,
             counters: torch.Tensor | None = None) -> torch.Tensor:
    """`(x @ weight.T) * scales` in x's dtype: x `[M, K]` (M <= 64), weight int8 `[N, K]` contiguous, scales
    `[N]`. `config`: a launch configuration (default: `pick_config`); `counters`: zeroed int32, at least
    `cdiv(N, MIN_BLOCK_N)` (from `new_counters`), else a shared per-device set is used."""
    if weight.dtype != torch.int8:
        raise ValueError(f"w8a16_mm: weight must be int8, got {weight.dtype}")
    return _mm(x, weight, scales, config, counters)


def dense_mm(x: torch.Tensor, weight: torch.Tensor, config: Config, counters: torch.Tensor | None = None,
             gelu: bool = False) -> torch.Tensor:
    """`x @ weight.T` for a float weight `[N, K]` (K contiguous, x's dtype) by the same tensor-core kernel, for
    decode shapes where `DENSE_CONFIGS` measured it faster than cuBLAS (`dense_config`); `gelu`: exact GELU of
    the product in the epilogue (one kernel for the MLP's first linear and its activation)."""
    if weight.dtype != x.dtype:
        raise ValueError(f"dense_mm: weight {weight.dtype} and x {x.dtype} differ")
    if config.kernel != "dot" or (gelu and config.reduce == "atomic"):
        raise ValueError(f"dense_mm runs the dot kernel, with GELU not on atomic splits; got {config.label}")
    return _mm(x, weight, None, config, counters, activation=1 if gelu else 0)


def _mm(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None, config: Config | None,
        counters: torch.Tensor | None, activation: int = 0) -> torch.Tensor:
    rows, depth = x.shape
    outputs = weight.shape[0]
    if rows > MAX_ROWS:
        raise ValueError(f"the Triton decode GEMM takes at most {MAX_ROWS} rows, got {rows}")
    if weight.shape[1] != depth or weight.stride(1) != 1:
        raise ValueError(f"the Triton decode GEMM: weight must be [N, {depth}] with K contiguous, got "
                         f"{tuple(weight.shape)} strides {weight.stride()}")
    if x.stride(1) != 1:
        x = x.contiguous()
    cfg = config or pick_config(rows, outputs, depth, x.device)
    if cfg.kernel == "gemv" and rows != 1:  # a gemv config given for M > 1
        cfg = default_config(rows, outputs, depth, x.device)
    k_tiles = triton.cdiv(depth, cfg.block_k)
    n_tiles = triton.cdiv(outputs, cfg.block_n)
    split = cfg.split_k or auto_split(n_tiles, k_tiles, x.device, cfg.kernel)
    tiles_per_split = triton.cdiv(k_tiles, min(max(split, 1), k_tiles))
    split = triton.cdiv(k_tiles, tiles_per_split)  # no empty split
    out = torch.empty(rows, outputs, dtype=x.dtype, device=x.device)
    if split == 1:
        reduce, workspace, cnt = _REDUCE_NONE, out, out
    elif cfg.reduce == "atomic":
        reduce, cnt = _REDUCE_ATOMIC, out
        workspace = torch.zeros(rows, outputs, dtype=torch.float32, device=x.device)
    else:
        reduce = _REDUCE_FIXUP
        workspace = torch.empty(split, rows, outputs, dtype=torch.float32, device=x.device)
        if counters is None or counters.numel() < n_tiles:
            counters = _counters_for(x.device, n_tiles)
        cnt = counters
    even_k = depth % cfg.block_k == 0
    grid = (n_tiles, split)
    scale_arg = scales if scales is not None else out  # not read without HAS_SCALE
    if cfg.kernel == "gemv":
        assert scales is not None, "the gemv kernel is int8-only"
        _gemv_kernel[grid](x, weight, scales, out, workspace, cnt, outputs, depth, weight.stride(0), k_tiles,
                           tiles_per_split, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=even_k,
                           REDUCE=reduce, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    else:
        _dot_kernel[grid](x, weight, scale_arg, out, workspace, cnt, rows, outputs, depth, x.stride(0),
                          weight.stride(0), k_tiles, tiles_per_split, BLOCK_M=m_bucket(max(rows, 2)),
                          BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=even_k, REDUCE=reduce,
                          PRECISION="ieee" if x.dtype == torch.float32 else "tf32", HAS_SCALE=scales is not None,
                          ACTIVATION=activation, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if reduce == _REDUCE_ATOMIC:
        out.copy_(workspace)
    return out


@triton.jit
def _w8a16_gather_kernel(a_ptr, w_ptr, s_ptr, ids_ptr, out_ptr, N, K, experts, stride_am,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    row = tl.program_id(1)
    expert = tl.load(ids_ptr + row)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if expert < experts:  # another rank's expert: no weight read, a zero row
        w_base = w_ptr + expert.to(tl.int64) * N * K
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(a_ptr + row * stride_am + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
            w = tl.load(w_base + offs_n[:, None] * K + offs_k[None, :],
                        mask=(offs_n[:, None] < N) & (offs_k[None, :] < K), other=0)
            acc += tl.sum(w.to(tl.float32) * a[None, :], axis=1)
        scale = tl.load(s_ptr + expert.to(tl.int64) * N + offs_n, mask=offs_n < N, other=0.0)
        acc = acc * scale.to(tl.float32)
    tl.store(out_ptr + row * N + offs_n, acc.to(out_ptr.dtype.element_ty), mask=offs_n < N)


def w8a16_gather_mm(a: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, ids: torch.Tensor,
                    block_n: int = 32, block_k: int = 256) -> torch.Tensor:
    """Row p of the result is `(a[p] @ weight[ids[p]].T) * scales[ids[p]]`, zero where `ids[p]` is not a valid
    expert: a `[P, K]`, weight int8 `[E, N, K]`, scales `[E, N]`, ids `[P]`. Each row reads only its expert's
    weight, so a decode step with few (token, expert) pairs reads only the experts it uses."""
    rows, depth = a.shape
    experts, outputs = weight.shape[0], weight.shape[1]
    out = torch.empty(rows, outputs, dtype=a.dtype, device=a.device)
    _w8a16_gather_kernel[(triton.cdiv(outputs, block_n), rows)](a, weight, scales, ids, out, outputs, depth, experts,
                                                                a.stride(0), BLOCK_N=block_n, BLOCK_K=block_k)
    return out
