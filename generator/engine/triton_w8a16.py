"""A Triton W8A16 GEMM for small batches on CUDA: `x [M, K] (bf16/fp16/fp32) @ W^T`, W int8 `[N, K]`.

torch's own CUDA `_weight_int8pack_mm` runs one thread per output that walks a whole row of K (uncoalesced),
which is slower than bf16; this kernel reads the int8 tiles along K, converts them in registers and
accumulates with `tl.dot` in float32. The K range is split over several programs when N alone gives too
few (decode: M <= 16), and the partial sums are added and scaled afterwards. Fixed launch parameters (no
autotuning), so the first call can happen inside a CUDA graph capture. Imported only when Triton is present.
"""

from __future__ import annotations

from functools import cache

import torch
import triton
import triton.language as tl

_BLOCK_M = 16
_BLOCK_N = 64
_BLOCK_K = 128


@triton.jit
def _w8a16_kernel(x_ptr, w_ptr, out_ptr, M, N, K, stride_xm, stride_wn, k_per_split,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * k_per_split
    for k0 in range(k_start, k_start + k_per_split, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        w = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None],
                    mask=(offs_n[None, :] < N) & (offs_k[:, None] < K), other=0)
        acc += tl.dot(x, w.to(x.dtype))
    out = out_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :]
    tl.store(out, acc, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def _split_k(m_blocks: int, n_blocks: int, k_blocks: int, device: torch.device) -> int:
    """Enough programs to give every SM about two, without splits smaller than four K tiles."""
    sms = _sm_count(device)
    wanted = max(1, (2 * sms) // max(1, m_blocks * n_blocks))
    return max(1, min(wanted, k_blocks // 4))


def w8a16_mm(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, block_n: int = _BLOCK_N,
             block_k: int = _BLOCK_K, num_warps: int = 4) -> torch.Tensor:
    """`(x @ weight.T) * scales` in x's dtype; x `[M, K]` contiguous, weight int8 `[N, K]`, scales `[N]`.
    The block sizes and warps are parameters so bench/moe_quant_gpu.py can compare a few."""
    rows, depth = x.shape
    outputs = weight.shape[0]
    m_blocks, n_blocks = triton.cdiv(rows, _BLOCK_M), triton.cdiv(outputs, block_n)
    k_blocks = triton.cdiv(depth, block_k)
    split = _split_k(m_blocks, n_blocks, k_blocks, x.device)
    k_per_split = triton.cdiv(k_blocks, split) * block_k
    split = triton.cdiv(depth, k_per_split)
    partial = torch.empty(split, rows, outputs, dtype=torch.float32, device=x.device)
    _w8a16_kernel[(n_blocks, m_blocks, split)](x, weight, partial, rows, outputs, depth, x.stride(0),
                                               weight.stride(0), k_per_split,
                                               BLOCK_M=_BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k,
                                               num_warps=num_warps)
    summed = partial[0] if split == 1 else partial.sum(dim=0)
    return (summed * scales.float()).to(x.dtype)


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
