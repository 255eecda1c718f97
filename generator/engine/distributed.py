"""Ranks and collectives of the pytorch engine: torch.distributed with gloo on CPU and NCCL on GPU.

The launcher (mpirun, or `mpirun ... tritonserver` in leader mode) gives each process its rank through the
OpenMPI / PMI environment and the rendezvous through MASTER_ADDR / MASTER_PORT; no MPI call is made here, so
this also works inside tritonserver's python-backend stubs.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from generator.engine.allreduce_norm import PeerAllReduceNorm, enable_symmetric_memory
from generator.errors import ConfigError
from generator.formats.mapping import Mapping

QUIET = -1  # kind of the step message that moves the next one to gloo (see Communicator.broadcast_step)
# "fused" (default): decode all-reduces through symmetric memory, at TP2 each block's fused with its residual add
# and LayerNorm (engine/allreduce_norm.py); "oneshot": the all-reduce alone through symmetric memory; "nccl": NCCL
ALL_REDUCE_ENV = "GEN_REPO_TP_ALLREDUCE"
ALL_REDUCE_MODES = ("fused", "oneshot", "nccl")
STEP_STREAM_ENV = "GEN_REPO_STEP_STREAM"  # "0": step messages on the compute stream, as before the side stream
_PEER_ALL_REDUCE_BYTES = 2 << 20  # decode-sized messages (256 x 4096 bf16); prefill's go through NCCL
log = logging.getLogger(__name__)
_Peer = TypeVar("_Peer", "PeerAllReduce", PeerAllReduceNorm)
# followers block in a broadcast while rank 0 is idle (a server can sit idle for days): never time out there
_IDLE_TIMEOUT = timedelta(days=365)


def _switch(name: str, allowed: tuple[str, ...]) -> str:
    """The value of a multi-rank switch (its first allowed value when unset); ConfigError for anything else.
    Every rank reads its own environment: launchers pass one environment to all ranks."""
    value = os.environ.get(name, allowed[0])
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _single_cta_options() -> Any:
    """NCCL options of the step-message group: one block (CTA), on the SM the carveout leaves free."""
    options_type = getattr(dist, "ProcessGroupNCCL", None)
    if options_type is None:  # a CPU-only build
        return None
    options = options_type.Options()
    config = getattr(options, "config", None)
    if config is None or not hasattr(config, "max_ctas"):
        log.warning("this torch cannot limit an NCCL group's CTAs; step messages use NCCL's default")
        return None
    config.min_ctas = 1
    config.max_ctas = 1
    return options


def pick_device(local_rank: int, requested: str | None = None) -> torch.device:
    """`requested` if given, else cuda:{local_rank % device_count} when CUDA is available, else CPU."""
    if requested:
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


class Communicator:
    """The collectives one rank needs: TP all-reduce / all-gather, PP send / recv, and the step-plan broadcast.

    With one rank every operation is the identity, and torch.distributed is never initialised.
    """

    def __init__(self, mapping: Mapping, device: torch.device) -> None:
        self.mapping = mapping
        self.device = device
        self.world_size = mapping.world_size
        self._tp_group: Any = None
        self._control_group: Any = None
        self._peer_all_reduce: PeerAllReduce | None = None
        self.peer_norm: PeerAllReduceNorm | None = None  # the fused all-reduce + add + LayerNorm, when enabled
        # busy step messages go over their own NCCL group on their own stream (see broadcast_step)
        self._step_group: Any = None
        self._step_stream: torch.cuda.Stream | None = None
        # step messages and tokens travel as tensors here: on the GPU for NCCL, on the CPU for gloo
        self._tensor_device = device if device.type == "cuda" else torch.device("cpu")
        self._quiet = True  # followers start by waiting on gloo (rank 0 may take long to get its first request)
        if self.world_size == 1:
            return
        if not dist.is_initialized():
            if "MASTER_PORT" not in os.environ:
                raise ConfigError("a multi-rank engine needs MASTER_ADDR/MASTER_PORT in the environment "
                                  "(`gen-repo run` and `gen-repo serve` set them; with a bare mpirun pass "
                                  "-x MASTER_ADDR=127.0.0.1 -x MASTER_PORT=<free port>)")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            backend = "nccl" if device.type == "cuda" else "gloo"
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group(backend=backend, init_method="env://", rank=mapping.rank,
                                    world_size=self.world_size, timeout=_IDLE_TIMEOUT)
        if dist.get_world_size() != self.world_size:
            raise ConfigError(f"the launch has {dist.get_world_size()} ranks but the engine needs "
                              f"{self.world_size} (tp_size x pp_size)")
        # every rank must create every group, in the same order
        tp = mapping.tensor_parallel_size
        for pp_rank in range(mapping.pipeline_parallel_size):
            ranks = list(range(pp_rank * tp, (pp_rank + 1) * tp))
            group = dist.new_group(ranks) if tp > 1 else None
            if mapping.rank in ranks:
                self._tp_group = group
        # step plans are small python objects: send them over gloo even when tensors go over NCCL
        self._control_group = (dist.new_group(backend="gloo", timeout=_IDLE_TIMEOUT)
                               if dist.get_backend() != "gloo" else dist.group.WORLD)
        if device.type == "cuda" and _switch(STEP_STREAM_ENV, ("1", "0")) == "1":
            self._step_group = dist.new_group(backend="nccl", timeout=_IDLE_TIMEOUT,
                                              pg_options=_single_cta_options())
            self._step_stream = torch.cuda.Stream(device)
            with torch.cuda.stream(self._step_stream):  # NCCL sets a communicator up on its first call: now,
                dist.broadcast(torch.zeros(1, device=device), src=0, group=self._step_group)  # not in a request
            # A follower's receive of the next step waits on its GPU while the forward it queued runs. Kernels
            # that size their grid to every SM (torch's grouped GEMM of the MoE layers) then have one block that
            # cannot start until that wait ends: DBRX TP4's batch-16 step took 42 ms instead of 35. The
            # carveout is process-wide (cuBLAS sizes its grids by it too) and set before the decode graphs are
            # captured, since a grid is fixed at capture.
            set_carveout = getattr(torch._C, "_set_sm_carveout_experimental", None)
            if set_carveout is None:
                log.warning("this torch has no SM carveout; MoE layers may wait behind the step messages")
            else:
                set_carveout(1)

    # tensor parallelism -------------------------------------------------------------------------------
    def tp_all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over this rank's TP group: use the returned tensor (NCCL sums in place, the peer path does not)."""
        if self._tp_group is None:
            return tensor
        peer = self._peer_all_reduce
        if peer is not None and peer.fits(tensor):
            return peer(tensor)
        dist.all_reduce(tensor, group=self._tp_group)
        return tensor

    def enable_peer_all_reduce(self, dtype: torch.dtype, fused_layers: bool) -> None:
        """Send decode-sized all-reduces of `dtype` through symmetric memory (see `PeerAllReduce`), and at TP2
        build the fused all-reduce + add + LayerNorm (`peer_norm`) when the model's layer loop can use it
        (`fused_layers`), as `GEN_REPO_TP_ALLREDUCE` says. Every TP rank must call this at the same point, with the
        same settings (checked: a rank on another path would wait for its peers forever); where it cannot work
        (CPU, float16, no peer access) NCCL stays in charge. Each buffer is allocated on every rank, the ranks
        agree that all succeeded, and only then do they map each other's (a collective)."""
        if self._tp_group is None:
            return
        raw = os.environ.get(ALL_REDUCE_ENV, ALL_REDUCE_MODES[0])
        self._agree(ALL_REDUCE_MODES.index(raw) if raw in ALL_REDUCE_MODES else -1, f"{ALL_REDUCE_ENV} ({raw!r} here)")
        mode = _switch(ALL_REDUCE_ENV, ALL_REDUCE_MODES)  # a typo: the same one-line error on every rank
        self._agree(int(fused_layers), f"GEN_REPO_FUSED_NORM / GEN_REPO_PAGED_KERNEL (fused layers {fused_layers} here)")
        usable = self.device.type == "cuda" and dtype in PeerAllReduce.DTYPES and mode != "nccl"
        if not self.min_over_ranks(int(usable)):
            return
        peer = self._built(lambda: PeerAllReduce(self._tp_group, self.device, dtype, _PEER_ALL_REDUCE_BYTES),
                           "symmetric-memory all-reduce unavailable (%s); using NCCL")
        if peer is None:
            return
        self._peer_all_reduce = peer
        # measured on H200s (bench/tp_allreduce_gpu.py): at TP2 the fused boundary takes 6.4-10.1 us where one-shot
        # + add_layer_norm take 10.8-17.2. At TP4 only an earlier version (a flag barrier, remote loads) was
        # measured, and it was slower (14.6 vs 11.5 us at one row). So it is built for two ranks only.
        if mode == "fused" and fused_layers and self.mapping.tensor_parallel_size == 2:
            self.peer_norm = self._built(
                lambda: PeerAllReduceNorm(self._tp_group, self.device, dtype, _PEER_ALL_REDUCE_BYTES),
                "fused all-reduce + LayerNorm unavailable (%s); using separate kernels")
        log.info("TP all-reduce: %s", "one-shot, fused with add + LayerNorm at block boundaries"
                 if self.peer_norm else "one-shot")

    def _built(self, make: Callable[[], _Peer], failure: str) -> _Peer | None:
        """`make()` on every rank, then `connect()` (a collective) only if every rank made it, then the same
        verdict everywhere: the object, or None (logged with `failure`) if any rank failed a step. An old torch, a
        host without peer access or no Triton then leaves NCCL or the separate kernels in charge."""
        made: _Peer | None = None
        try:
            made = make()
        except Exception as error:  # noqa: BLE001 - any failure to allocate: fall back, on every rank
            log.warning(failure, error)
        if not self.min_over_ranks(int(made is not None)):
            return None
        assert made is not None
        connected = True
        try:
            made.connect()
        except Exception as error:  # noqa: BLE001 - e.g. no peer mapping: every rank fails the same way
            log.warning(failure, error)
            connected = False
        return made if self.min_over_ranks(int(connected)) else None

    def _agree(self, value: int, what: str) -> None:
        """ConfigError (one line, on every rank) unless every rank passes the same `value`."""
        if self.min_over_ranks(value) != -self.min_over_ranks(-value):
            raise ConfigError(f"the ranks disagree on {what}: every rank must run with the same setting")

    def tp_all_gather(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """Concatenate every TP rank's `tensor` along `dim`, in TP-rank order."""
        if self._tp_group is None:
            return tensor
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.mapping.tensor_parallel_size)]
        dist.all_gather(parts, tensor, group=self._tp_group)
        return torch.cat(parts, dim=dim)

    # pipeline parallelism -----------------------------------------------------------------------------
    def send_to_next_stage(self, tensor: torch.Tensor) -> None:
        dist.send(tensor.contiguous(), dst=self.mapping.rank + self.mapping.tensor_parallel_size)

    def recv_from_previous_stage(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        tensor = torch.empty(shape, dtype=dtype, device=self.device)
        dist.recv(tensor, src=self.mapping.rank - self.mapping.tensor_parallel_size)
        return tensor

    def logits_source_rank(self) -> int:
        """The rank that hands the logits to rank 0: TP rank 0 of the last pipeline stage."""
        return (self.mapping.pipeline_parallel_size - 1) * self.mapping.tensor_parallel_size

    def send_logits_to_leader(self, logits: torch.Tensor) -> None:
        dist.send(logits.contiguous(), dst=0)

    def recv_logits(self, shape: tuple[int, ...]) -> torch.Tensor:
        logits = torch.empty(shape, dtype=torch.float32, device=self.device)
        dist.recv(logits, src=self.logits_source_rank())
        return logits

    # step plans -------------------------------------------------------------------------------------------
    def broadcast_plan(self, plan: Any) -> Any:
        """Rank 0 passes a python object, the others pass None and get it back (over gloo; for rare messages
        such as the start-up settings)."""
        if self.world_size == 1:
            return plan
        box = [plan]
        dist.broadcast_object_list(box, src=0, group=self._control_group)
        return box[0]

    def broadcast_step(self, message: np.ndarray | None) -> np.ndarray:
        """Rank 0 passes a step message (int64 array, `message[0]` its kind), the others pass None and get it.

        While rank 0 is busy, messages go as tensors: on a GPU over the step group's NCCL communicator on the side
        stream (no pickling, no CPU collective), on CPU over gloo. A message whose kind is `QUIET` (rank 0 is
        about to sit idle) switches both sides to the gloo control group, where a follower can wait for days
        without spinning its GPU; the next message goes there and switches back.
        """
        if self.world_size == 1:
            assert message is not None
            return message
        if self._quiet:
            box = [message]
            dist.broadcast_object_list(box, src=0, group=self._control_group)
            received = np.asarray(box[0], dtype=np.int64)
            self._quiet = False
        else:
            # On a GPU the message travels on a side stream over its own communicator: a follower's wait for
            # it then does not wait for its own previous forward, so it launches the next step while the
            # previous one still runs, as rank 0 does (lookahead).
            stream = self._step_stream
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                header = torch.zeros(1, dtype=torch.long, device=self._tensor_device)
                if message is not None:
                    header.fill_(len(message))
                dist.broadcast(header, src=0, group=self._step_group)
                if message is not None:
                    payload = torch.from_numpy(message).to(self._tensor_device)
                else:
                    payload = torch.empty(int(header.item()), dtype=torch.long, device=self._tensor_device)
                dist.broadcast(payload, src=0, group=self._step_group)
                received = message if message is not None else payload.cpu().numpy()
        if int(received[0]) == QUIET:
            self._quiet = True
        return received

    def broadcast_tokens(self, tokens: torch.Tensor | None, count: int) -> torch.Tensor:
        """Rank 0 passes `count` int64 tokens, the others None and get them: on the compute stream over the
        world group, so stream-ordered after the forward that sampled them, with no host sync on a GPU. Every
        rank calls it right after the step message that announced the tokens, so the calls line up."""
        if tokens is None:
            tokens = torch.empty(count, dtype=torch.long, device=self._tensor_device)
        dist.broadcast(tokens, src=0)
        return tokens

    def go_quiet(self) -> None:
        """Rank 0, before it waits for work: move the step messages to gloo until the next one."""
        if self.world_size > 1 and not self._quiet:
            self.broadcast_step(np.array([QUIET], dtype=np.int64))

    def min_over_ranks(self, value: int) -> int:
        """The smallest `value` any rank passes (every rank must call it), e.g. the KV pool's block count."""
        if self.world_size == 1:
            return value
        box = torch.tensor([value], dtype=torch.long)
        dist.all_reduce(box, op=dist.ReduceOp.MIN, group=self._control_group)
        return int(box.item())

    def close(self) -> None:
        self._peer_all_reduce = None
        self.peer_norm = None
        if self._step_stream is not None:
            self._step_stream.synchronize()  # the last message (shutdown) has left before the groups go
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


class PeerAllReduce:
    """A TP all-reduce for decode-sized messages through torch's symmetric memory (NVLink peer access).

    One kernel per call (`one_shot_all_reduce_copy_out`): it copies this rank's tensor into its symmetric buffer,
    waits at a barrier for the peers, reads every peer's buffer and writes the sum, then meets the peers at a
    second barrier, so the buffer is free for the next call at once. NCCL's ring protocol costs more than the
    data at these sizes. It captures into CUDA graphs; multicast (NVLS) is not used.
    """

    DTYPES = (torch.bfloat16, torch.float32)  # what torch's kernel is built for

    def __init__(self, group: dist.ProcessGroup, device: torch.device, dtype: torch.dtype, max_bytes: int) -> None:
        """This rank's buffer only; `connect` (a collective) maps the peers' once every rank has one."""
        import torch.distributed._symmetric_memory as symm_mem

        self.group_name = group.group_name
        enable_symmetric_memory(group)
        self.dtype = dtype
        self.buffer = symm_mem.empty(max_bytes // dtype.itemsize, dtype=dtype, device=device)
        self.handle: Any = None
        self._reduce = torch.ops.symm_mem.one_shot_all_reduce_copy_out

    def connect(self) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        self.handle = symm_mem.rendezvous(self.buffer, self.group_name)  # kept: it holds the peers' mappings

    def fits(self, tensor: torch.Tensor) -> bool:
        """Same dtype, contiguous, within the buffer, and 16-byte aligned like the buffer (the kernel's rule).
        Shapes and offsets only, never addresses: every rank must answer the same (allocations start aligned)."""
        return (tensor.dtype == self.dtype and tensor.is_contiguous() and tensor.numel() <= self.buffer.numel()
                and (tensor.numel() * tensor.element_size()) % 16 == 0
                and (tensor.storage_offset() * tensor.element_size()) % 16 == 0)

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        out = torch.empty(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
        self._reduce(self.buffer[:tensor.numel()], tensor, "sum", self.group_name, out)
        return out.view_as(tensor)

