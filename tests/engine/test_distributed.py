"""Multi-rank switches and the peer all-reduce's rule, on CPU (the collectives themselves: test_engine_mpi.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from generator.engine import distributed, rank_env
from generator.engine.allreduce_norm import PeerAllReduceNorm
from generator.engine.distributed import PeerAllReduce
from generator.engine.rank_env import free_port
from generator.errors import ConfigError
from generator.formats.mapping import Mapping


def test_multi_rank_switches_refuse_unknown_values(monkeypatch: pytest.MonkeyPatch) -> None:
    """GEN_REPO_STEP_STREAM / GEN_REPO_TP_ALLREDUCE decide collective steps on every rank: a typo is one clear
    error, never a silent default."""
    monkeypatch.setenv(distributed.ALL_REDUCE_ENV, "NCCL")
    with pytest.raises(ConfigError, match="GEN_REPO_TP_ALLREDUCE must be one of fused, oneshot, nccl, got 'NCCL'"):
        distributed._switch(distributed.ALL_REDUCE_ENV, distributed.ALL_REDUCE_MODES)
    monkeypatch.delenv(distributed.ALL_REDUCE_ENV)
    assert distributed._switch(distributed.ALL_REDUCE_ENV, distributed.ALL_REDUCE_MODES) == "fused"
    monkeypatch.setenv(distributed.STEP_STREAM_ENV, "0")
    assert distributed._switch(distributed.STEP_STREAM_ENV, ("1", "0")) == "0"
    monkeypatch.delenv(distributed.STEP_STREAM_ENV)
    assert distributed._switch(distributed.STEP_STREAM_ENV, ("1", "0")) == "1"


def test_the_peer_all_reduce_takes_what_every_rank_can_take() -> None:
    """`PeerAllReduce.fits` answers from dtype, size and offsets alone, so every rank takes the same path."""
    peer = PeerAllReduce.__new__(PeerAllReduce)  # the rule only: the buffer needs CUDA and peers
    peer.dtype, peer.buffer = torch.bfloat16, torch.empty(4096, dtype=torch.bfloat16)
    rows = torch.zeros(4, 1024, dtype=torch.bfloat16)
    assert peer.fits(rows) and peer.fits(rows[1:3])
    assert not peer.fits(rows.float())                                     # another dtype: NCCL
    assert not peer.fits(torch.zeros(5, 1024, dtype=torch.bfloat16))       # more than the buffer
    assert not peer.fits(rows[:, :3])                                      # not contiguous
    assert not peer.fits(torch.zeros(12, dtype=torch.bfloat16)[1:9])       # offset not 16-byte aligned
    assert not peer.fits(torch.zeros(7, dtype=torch.bfloat16))             # size not a multiple of 16 bytes


def test_the_fused_all_reduce_norm_takes_decode_messages_by_shape() -> None:
    """`PeerAllReduceNorm.fits` decides from dtype, shape and strides (never addresses): every rank fuses the same
    block boundaries, and prefill-sized messages go to NCCL and the separate add + LayerNorm."""
    fused = PeerAllReduceNorm.__new__(PeerAllReduceNorm)  # the rule only: the buffers need CUDA and peers
    fused.dtype, fused.max_elements = torch.bfloat16, 4 * 1024
    rows = torch.zeros(4, 1024, dtype=torch.bfloat16)
    assert fused.fits(rows) and fused.fits(rows[1:3])
    assert not fused.fits(rows.float())                                    # another dtype
    assert not fused.fits(torch.zeros(5, 1024, dtype=torch.bfloat16))      # more than a buffer: prefill
    assert not fused.fits(rows.t())                                        # columns not contiguous
    assert not fused.fits(rows.view(-1))                                   # not [rows, d]


_DISAGREE = """
import os, sys
from generator.engine.distributed import Communicator
from generator.errors import ConfigError
from generator.formats.mapping import Mapping
import torch
rank = int(sys.argv[1])
os.environ["GEN_REPO_TP_ALLREDUCE"] = sys.argv[2 + rank]
comm = Communicator(Mapping.create(tensor_parallel_size=2).with_rank(rank), torch.device("cpu"))
try:
    comm.enable_peer_all_reduce(torch.float32, fused_layers=sys.argv[4 + rank] == "1")
    print("agreed")
except ConfigError as error:
    print(f"error: {error}")
comm.close()
"""


@pytest.mark.parametrize(("modes", "fused"), [(("fused", "oneshot"), ("1", "1")), (("fused", "fused"), ("1", "0")),
                                                (("nccl", "NCCL"), ("1", "1")), (("nccl", "nccl"), ("0", "0"))])
def test_ranks_that_disagree_on_the_all_reduce_path_stop_with_one_line(modes: tuple[str, str],
                                                                        fused: tuple[str, str]) -> None:
    """A rank on the fused kernel beside one on another path would spin on the GPU forever: every rank checks
    at start that all run the same GEN_REPO_TP_ALLREDUCE and the same layer loop, and all stop with one line."""
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    ranks = [subprocess.Popen([sys.executable, "-c", _DISAGREE, str(rank), *modes, *fused], env={**env, "RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[2]) for rank in range(2)]
    outputs = [rank.communicate(timeout=120)[0].strip().splitlines()[-1] for rank in ranks]
    if modes[0] == modes[1] and fused[0] == fused[1]:
        assert outputs == ["agreed", "agreed"]
    else:
        assert all(line.startswith("error: the ranks disagree on ") for line in outputs), outputs


def test_a_peer_path_that_fails_to_build_or_connect_falls_back() -> None:
    """Allocation, then (only if every rank allocated) the collective mapping; any failure leaves NCCL or the
    separate kernels in charge on every rank, never a half-built peer path."""
    comm = distributed.Communicator(Mapping.create(), torch.device("cpu"))  # one rank: the verdicts are its own

    class Peer:
        def __init__(self, fail_connect: bool) -> None:
            self.fail_connect, self.connected = fail_connect, False

        def connect(self) -> None:
            if self.fail_connect:
                raise RuntimeError("no peer access")
            self.connected = True

    def fail_to_allocate() -> Peer:
        raise RuntimeError("out of memory")

    assert comm._built(fail_to_allocate, "unavailable (%s)") is None  # type: ignore[type-var]
    assert comm._built(lambda: Peer(fail_connect=True), "unavailable (%s)") is None  # type: ignore[type-var]
    built = comm._built(lambda: Peer(fail_connect=False), "unavailable (%s)")  # type: ignore[type-var]
    assert isinstance(built, Peer) and built.connected


def test_free_ports_come_from_below_the_ephemeral_range() -> None:
    """A picked port is bindable and lies below the range the OS hands to outgoing connections, so a rank's
    sockets cannot take it before tritonserver binds it (the old OS-picked port could be: a flaky test)."""
    start = rank_env._ephemeral_start()
    for _ in range(20):
        port = free_port()
        assert rank_env._LOWEST_PICK <= port < start
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))
