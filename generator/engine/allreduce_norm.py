"""The TP all-reduce of a sublayer's output fused with the residual add and the next LayerNorm: one kernel.

After each attention and MLP block every TP rank holds a partial sum of the block's output. The plain path is
three kernels per block: an all-reduce, the residual add and the LayerNorm (`attention.add_layer_norm` fuses the
last two). In decode the all-reduce is a few microseconds of NVLink latency and the other kernels are a few more
of launch and tail; at TP2 these fixed costs are a quarter of a step that the GEMMs no longer fill.

`PeerAllReduceNorm` does it in one Triton kernel over torch's symmetric memory (each rank maps every peer's
buffer): each program copies its rows of this rank's partial into this rank's buffer, meets the same program of
every peer at a flag barrier, then sums the rows of every rank's buffer in rank order (so every rank computes
the same bits), adds the residual and normalizes. Messages up to 2 MiB (decode); larger ones (prefill) take
NCCL and `add_layer_norm`. Multicast (NVLS) is not used.

There is no second barrier at the end of a call. Instead two buffers alternate, one for the attention blocks'
outputs and one for the MLP blocks' (`role`), and a rank writes a buffer again only after a collective that
every peer enters after its previous kernel ended (kernels on one stream run one after the other): between two
calls on one buffer the layer loop always makes a call on the other buffer, or a prefill-sized message goes
through NCCL. The flags are per program and per peer; every rank launches the same programs for a given row
count, so each call raises and lowers each flag once. All programs of a call (at most 64) must be resident at
once on every rank, which a GPU of more SMs than that guarantees.
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
            # rounded once; torch's one-shot kernel rounds after each add: the same bits at TP2, not beyond
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
        self.data = symm_mem.empty(len(ROLES) * self.max_elements, dtype=dtype, device=device)
        self.flags = symm_mem.empty(PROGRAMS * self.world, dtype=torch.int32, device=device)
        self.flags.zero_()
        self.handles: tuple = ()
        self.data_ptrs = self.flag_ptrs = torch.empty(0, dtype=torch.int64, device=device)

    def connect(self) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        # the handles are kept: they hold the mappings of the peers' buffers
        self.handles = (symm_mem.rendezvous(self.data, self.group.group_name),
                        symm_mem.rendezvous(self.flags, self.group.group_name))
        self.data_ptrs = torch.tensor(list(self.handles[0].buffer_ptrs), dtype=torch.int64, device=self.device)
        self.flag_ptrs = torch.tensor(list(self.handles[1].buffer_ptrs), dtype=torch.int64, device=self.device)
        torch.cuda.synchronize(self.device)
        dist.barrier(group=self.group)  # every pad is zero before any rank raises a flag in it

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
            bias if bias is not None else residual, total, normed,
            self.data_ptrs, self.flag_ptrs, ROLES.index(role) * self.max_elements, rows,
            partial.stride(0), residual.stride(0), total.stride(0), normed.stride(0), eps, RANK=self.rank, WORLD=self.world, WIDTH=width, BLOCK=block, PROGRAMS=PROGRAMS,
            HAS_NORM=weight is not None, HAS_BIAS=bias is not None, num_warps=8 if block >= 2048 else 4)
        return total, out
