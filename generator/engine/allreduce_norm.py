"""The TP all-reduce of a sublayer's output fused with the residual add and the next LayerNorm: one kernel.

After each attention and MLP block every TP rank holds a partial sum of the block's output. The plain path is
three kernels per block: an all-reduce, the residual add and the LayerNorm (`attention.add_layer_norm` fuses the
last two). In decode the all-reduce is a few microseconds of NVLink latency and the other kernels are a few more
of launch and tail; at TP2 these fixed costs are a quarter of a step that the GEMMs no longer fill.

`PeerAllReduceNorm` does it in one Triton kernel over torch's symmetric memory (each rank maps every peer's
buffer). Each program stores its rows of this rank's partial straight into every peer's buffer, in this rank's
slot, then reads the peers' slots of its own buffer, sums every rank's rows in rank order (so every rank
computes the same bits), adds the residual and normalizes. Messages up to 2 MiB (decode); larger ones (prefill)
take NCCL and `add_layer_norm`. Multicast (NVLS) is not used.

No flag says that a peer's rows have arrived: a buffer's elements hold the bit pattern of -0.0 (EMPTY) until a
peer writes them, a sender writes -0.0 as +0.0 (the same number), and a reader waits until no element it needs
is EMPTY, then sets them EMPTY again. So a call costs one NVLink write per peer and no remote load or fence
(measured: 6.4 against 8.2 us at one row, 10.1 against 12.0 at 64 x 4096, for a flag barrier with remote loads).

There is no barrier at the end of a call either. Two buffers alternate, one for the attention blocks' outputs
and one for the MLP blocks' (`role`). A rank writes into a peer's buffer again only after it has read that
peer's rows of a call on the other buffer (or passed another collective), which the peer wrote after its
previous kernel, the one that read and emptied this buffer, had ended (kernels on one stream run one after the
other). Between two calls on one buffer the layer loop always makes a call on the other, or a prefill-sized
message goes through NCCL. All programs of a call (at most 64) must be resident at once on every rank, as a
program waits for its peer's program; a GPU of more SMs than that guarantees it. A rank that stops in the middle
of a forward (an error) leaves its peers' buffers out of step, as a missed NCCL call would leave the group: the
engine must be restarted (an error in a follower's forward already ends its `follow` loop).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

try:  # part of torch's CUDA wheels
    import triton
    import triton.language as tl

    from generator.engine.attention import layer_norm_row
except ImportError:  # pragma: no cover - CPU-only installs never build this class
    triton = None

PROGRAMS = 64           # row r is always program r % PROGRAMS's; min(rows, PROGRAMS) programs run
ROLES = ("attention", "mlp")

if triton is not None:
    @triton.jit
    def _all_reduce_add_norm_kernel(partial_ptr, residual_ptr, weight_ptr, bias_ptr, sum_ptr, out_ptr,
                              buffers_ptr, role_offset, slot, rows,
                              stride_partial, stride_residual, stride_sum, stride_out, eps,
                              RANK: tl.constexpr, WORLD: tl.constexpr, WIDTH: tl.constexpr,
                              BLOCK: tl.constexpr, PROGRAMS: tl.constexpr, HAS_NORM: tl.constexpr,
                              HAS_BIAS: tl.constexpr, BITS: tl.constexpr, EMPTY: tl.constexpr):
        """Each program stores its rows straight into every peer's buffer (slot RANK), then waits on its own
        buffer until each element of the peers' rows has left the EMPTY bit pattern (-0.0, which a sender writes
        as +0.0): no flag, fence or remote load. It empties what it read for the buffer's next call."""
        program = tl.program_id(0)
        columns = tl.arange(0, BLOCK)
        mask = columns < WIDTH
        dtype = partial_ptr.dtype.element_ty
        for row in range(program, rows, PROGRAMS):
            part = tl.load(partial_ptr + row * stride_partial + columns, mask=mask, other=0.0)
            part = tl.where(part == 0.0, tl.zeros_like(part), part)  # -0.0 would read as "not arrived"
            for peer in tl.static_range(WORLD):
                if peer != RANK:
                    dest = tl.load(buffers_ptr + peer).to(tl.pointer_type(dtype)) + role_offset + RANK * slot
                    tl.store(dest + row * WIDTH + columns, part, mask=mask)
        tl.debug_barrier()  # every row is pushed before any thread waits: no compiler may sink a push below a wait
        own = tl.load(buffers_ptr + RANK).to(tl.pointer_type(dtype)) + role_offset
        empty = tl.full([BLOCK], EMPTY, BITS)
        for row in range(program, rows, PROGRAMS):
            part = tl.load(partial_ptr + row * stride_partial + columns, mask=mask, other=0.0)
            part = tl.where(part == 0.0, tl.zeros_like(part), part)  # the bits the peers received
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for rank in tl.static_range(WORLD):  # rank order: the same sum on every rank
                if rank == RANK:
                    acc += part.to(tl.float32)
                else:
                    cells = (own + rank * slot + row * WIDTH).to(tl.pointer_type(BITS)) + columns
                    bits = tl.load(cells, mask=mask, other=0, volatile=True)
                    while tl.sum((bits == EMPTY).to(tl.int32), axis=0) > 0:
                        bits = tl.load(cells, mask=mask, other=0, volatile=True)
                    acc += bits.to(dtype, bitcast=True).to(tl.float32)
                    tl.store(cells, empty, mask=mask)  # empty again for this buffer's next call
            reduced = acc.to(dtype)
            residual = tl.load(residual_ptr + row * stride_residual + columns, mask=mask, other=0.0)
            total = (reduced.to(tl.float32) + residual.to(tl.float32)).to(dtype)  # as add_layer_norm rounds
            tl.store(sum_ptr + row * stride_sum + columns, total, mask=mask)
            if HAS_NORM:
                normed = layer_norm_row(total, columns, mask, weight_ptr, bias_ptr, eps, WIDTH, HAS_BIAS)
                tl.store(out_ptr + row * stride_out + columns, normed.to(dtype), mask=mask)

def enable_symmetric_memory(group: dist.ProcessGroup) -> None:
    """torch before 2.8 needs symmetric memory enabled per group (deprecated, a warning in the log, after)."""
    import torch.distributed._symmetric_memory as symm_mem

    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    if (major, minor) < (2, 8):
        symm_mem.enable_symm_mem_for_group(group.group_name)


class PeerAllReduceNorm:
    """`sum over TP ranks of partial + residual`, and its LayerNorm, in one kernel (CUDA; the engine builds it
    for bf16 and float32, as `PeerAllReduce`)."""

    def __init__(self, group: dist.ProcessGroup, device: torch.device, dtype: torch.dtype, max_bytes: int) -> None:
        """This rank's buffers only; `connect` (a collective) maps the peers' once every rank has them."""
        import torch.distributed._symmetric_memory as symm_mem

        assert triton is not None
        enable_symmetric_memory(group)
        self.group = group
        self.device = device
        self.dtype = dtype
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.max_elements = max_bytes // dtype.itemsize
        # per role, one slot per sending rank; every element EMPTY until a peer writes it
        self.data = symm_mem.empty(len(ROLES) * self.world * self.max_elements, dtype=dtype, device=device)
        self.bits = {2: torch.int16, 4: torch.int32}[dtype.itemsize]
        self.empty = -(1 << (8 * dtype.itemsize - 1))  # the bits of -0.0
        self.data.view(self.bits).fill_(self.empty)
        self.handle: object = None
        self.data_ptrs = torch.empty(0, dtype=torch.int64, device=device)

    def connect(self) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        self.handle = symm_mem.rendezvous(self.data, self.group.group_name)  # kept: it holds the peers' mappings
        self.data_ptrs = torch.tensor(list(self.handle.buffer_ptrs), dtype=torch.int64, device=self.device)  # type: ignore[attr-defined]
        torch.cuda.synchronize(self.device)
        dist.barrier(group=self.group)  # every buffer is EMPTY before any rank writes into it

    def fits(self, partial: torch.Tensor) -> bool:
        """A decode-sized `[rows, d]` message of this dtype with unit stride along d (shapes only: every rank
        answers the same)."""
        return (partial.dim() == 2 and partial.dtype == self.dtype and partial.stride(-1) == 1
                and partial.numel() <= self.max_elements)

    def __call__(self, role: str, partial: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None,
                 bias: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(residual + all-reduced partial, its LayerNorm with `weight`/`bias`, or None without `weight`).
        `role` ("attention" or "mlp") picks the buffer. Two calls on one buffer need a call on the other buffer,
        or another TP collective, between them (see the module docstring)."""
        assert triton is not None
        rows, width = partial.shape
        total = torch.empty_like(residual)
        out = torch.empty_like(residual) if weight is not None else None
        if rows == 0:
            return total, out
        block = triton.next_power_of_2(width)
        normed = out if out is not None else total  # not written without a norm
        _all_reduce_add_norm_kernel[(min(rows, PROGRAMS),)](
            partial, residual, weight if weight is not None else residual,
            bias if bias is not None else residual, total, normed, self.data_ptrs,
            ROLES.index(role) * self.world * self.max_elements, self.max_elements, rows, partial.stride(0),
            residual.stride(0), total.stride(0), normed.stride(0), eps, RANK=self.rank, WORLD=self.world,
            WIDTH=width, BLOCK=block, PROGRAMS=PROGRAMS, HAS_NORM=weight is not None, HAS_BIAS=bias is not None,
            BITS=tl.int16 if self.bits == torch.int16 else tl.int32, EMPTY=self.empty,
            num_warps=8 if block >= 2048 else 4)
        return total, out
