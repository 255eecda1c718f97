"""The TP all-reduce of a sublayer's output fused with the residual add and the next LayerNorm: one kernel.

After each attention and MLP block every TP rank holds a partial sum of the block's output. The plain path is
three kernels per block: an all-reduce, the residual add and the LayerNorm (`attention.add_layer_norm` fuses the
last two). In decode the all-reduce is a few microseconds of NVLink latency and the other kernels are a few more
of launch and tail; at TP2 these fixed costs are a quarter of a step that the GEMMs no longer fill.

`PeerAllReduceNorm` does it in one Triton kernel over torch's symmetric memory (each rank maps every peer's
buffer): each program copies its rows of this rank's partial into this rank's buffer, meets the same program of
every peer at a flag barrier, then sums the rows of every rank's buffer in rank order (so every rank computes
the same bits), adds the residual and normalizes. Two buffers, one for the attention outputs and one for the
MLP outputs, which alternate: a rank writes a buffer again only after the barrier of the call between, which
the peers enter only once they finished reading it. There is no second barrier. Messages up to 2 MiB (decode);
larger ones (prefill) take NCCL and `add_layer_norm`. Multicast (NVLS) is not used.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

try:  # part of torch's CUDA wheels
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs never build this class
    triton = None

PROGRAMS = 64           # fixed grid width: row r is always program r % PROGRAMS's (see the module docstring)
ROLES = ("attention", "mlp")

if triton is not None:
    @triton.jit
    def _signal(flag):
        """Raise this program's flag in a peer's pad, once the peer has taken the previous one down."""
        while tl.atomic_cas(flag, 0, 1, sem="release", scope="sys") != 0:
            pass

    @triton.jit
    def _wait(flag):
        """Wait for a peer program's flag in this rank's pad and take it down."""
        while tl.atomic_cas(flag, 1, 0, sem="acquire", scope="sys") != 1:
            pass

    @triton.jit
    def _all_reduce_add_norm_kernel(partial_ptr, residual_ptr, weight_ptr, bias_ptr, sum_ptr, out_ptr,
                                    buffers_ptr, flags_ptr, role_offset, rows,
                                    stride_partial, stride_residual, stride_sum, stride_out, eps,
                                    RANK: tl.constexpr, WORLD: tl.constexpr, WIDTH: tl.constexpr,
                                    BLOCK: tl.constexpr, PROGRAMS: tl.constexpr, HAS_NORM: tl.constexpr,
                                    HAS_BIAS: tl.constexpr):
        program = tl.program_id(0)
        columns = tl.arange(0, BLOCK)
        mask = columns < WIDTH
        dtype = partial_ptr.dtype.element_ty
        own = tl.load(buffers_ptr + RANK).to(tl.pointer_type(dtype)) + role_offset
        for row in range(program, rows, PROGRAMS):
            part = tl.load(partial_ptr + row * stride_partial + columns, mask=mask, other=0.0)
            tl.store(own + row * WIDTH + columns, part, mask=mask)
        tl.debug_barrier()  # every thread's rows are written before the flags go up
        for peer in tl.static_range(WORLD):
            if peer != RANK:
                _signal(tl.load(flags_ptr + peer).to(tl.pointer_type(tl.int32)) + program * WORLD + RANK)
        mine = tl.load(flags_ptr + RANK).to(tl.pointer_type(tl.int32)) + program * WORLD
        for peer in tl.static_range(WORLD):
            if peer != RANK:
                _wait(mine + peer)
        tl.debug_barrier()
        for row in range(program, rows, PROGRAMS):
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for rank in tl.static_range(WORLD):  # rank order: the same sum on every rank
                source = tl.load(buffers_ptr + rank).to(tl.pointer_type(dtype)) + role_offset
                acc += tl.load(source + row * WIDTH + columns, mask=mask, other=0.0).to(tl.float32)
            reduced = acc.to(dtype)  # rounded as the all-reduce's output is
            residual = tl.load(residual_ptr + row * stride_residual + columns, mask=mask, other=0.0)
            total = (reduced.to(tl.float32) + residual.to(tl.float32)).to(dtype)  # as add_layer_norm rounds
            tl.store(sum_ptr + row * stride_sum + columns, total, mask=mask)
            if HAS_NORM:
                values = total.to(tl.float32)
                mean = tl.sum(values, 0) / WIDTH
                centered = tl.where(mask, values - mean, 0.0)
                variance = tl.sum(centered * centered, 0) / WIDTH
                normed = centered * tl.rsqrt(variance + eps) * tl.load(weight_ptr + columns, mask=mask,
                                                                        other=0.0).to(tl.float32)
                if HAS_BIAS:
                    normed += tl.load(bias_ptr + columns, mask=mask, other=0.0).to(tl.float32)
                tl.store(out_ptr + row * stride_out + columns, normed.to(dtype), mask=mask)


class PeerAllReduceNorm:
    """`sum over TP ranks of partial + residual`, and its LayerNorm, in one kernel (CUDA, bf16/fp16/fp32)."""

    def __init__(self, group: dist.ProcessGroup, device: torch.device, dtype: torch.dtype, max_bytes: int) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        assert triton is not None
        self.dtype = dtype
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.max_elements = max_bytes // dtype.itemsize
        self.data = symm_mem.empty(len(ROLES) * self.max_elements, dtype=dtype, device=device)
        self.flags = symm_mem.empty(PROGRAMS * self.world, dtype=torch.int32, device=device)
        self.flags.zero_()
        data_handle = symm_mem.rendezvous(self.data, group.group_name)
        flag_handle = symm_mem.rendezvous(self.flags, group.group_name)
        self.data_ptrs = torch.tensor(list(data_handle.buffer_ptrs), dtype=torch.int64, device=device)
        self.flag_ptrs = torch.tensor(list(flag_handle.buffer_ptrs), dtype=torch.int64, device=device)
        torch.cuda.synchronize(device)
        dist.barrier(group=group)  # every pad is zero before any rank raises a flag in it

    def fits(self, partial: torch.Tensor) -> bool:
        """A decode-sized `[rows, d]` message of this dtype with unit stride along d (shapes only: every rank
        answers the same)."""
        return (partial.dim() == 2 and partial.dtype == self.dtype and partial.stride(-1) == 1
                and partial.numel() <= self.max_elements)

    def __call__(self, role: str, partial: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None,
                 bias: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(residual + all-reduced partial, its LayerNorm with `weight`/`bias`, or None without `weight`)."""
        assert triton is not None
        rows, width = partial.shape
        total = torch.empty_like(residual)
        out = torch.empty_like(residual) if weight is not None else None
        if rows == 0:
            return total, out
        block = triton.next_power_of_2(width)
        _all_reduce_add_norm_kernel[(min(rows, PROGRAMS),)](
            partial, residual, weight if weight is not None else residual,
            bias if bias is not None else residual, total, out if out is not None else total,
            self.data_ptrs, self.flag_ptrs, ROLES.index(role) * self.max_elements, rows,
            partial.stride(0), residual.stride(0), total.stride(0), (out if out is not None else total).stride(0),
            eps, RANK=self.rank, WORLD=self.world, WIDTH=width, BLOCK=block, PROGRAMS=PROGRAMS,
            HAS_NORM=weight is not None, HAS_BIAS=bias is not None, num_warps=8 if block >= 2048 else 4)
        return total, out
