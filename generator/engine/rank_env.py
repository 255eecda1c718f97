"""The launch environment: rank, world size and local rank of this process, from the launcher's variables
(mpirun, MPICH, torchrun or `generator.serving.local_launch`); a free port for a rendezvous; the environment of a
child that runs this package. No torch here: the Triton stub reads it before it knows whether to load one."""

from __future__ import annotations

import os
import random
import socket
from dataclasses import dataclass
from pathlib import Path

_RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "RANK")
_SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "WORLD_SIZE")
_LOCAL_RANK_VARIABLES = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "LOCAL_RANK")
#: the dir holding `generator/`
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


def _first_int(names: tuple[str, ...], default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return default


@dataclass(frozen=True)
class ProcessInfo:
    """Where this process sits in the launch: global rank, world size, rank on its host."""

    rank: int
    world_size: int
    local_rank: int


def process_info() -> ProcessInfo:
    """Rank, world size and local rank from the launcher's environment (1 process when there is none)."""
    rank = _first_int(_RANK_VARIABLES, 0)
    world = _first_int(_SIZE_VARIABLES, 1)
    return ProcessInfo(rank, world, _first_int(_LOCAL_RANK_VARIABLES, rank))


_LOWEST_PICK = 10000
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _ephemeral_start() -> int:
    try:
        return int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port() -> int:
    """A TCP port nothing listens on right now, below the OS's ephemeral range when there is room. A port the
    OS could hand to an outgoing connection may be taken before the server that was told it binds it (a
    multi-rank engine opens many while its Triton model loads, before the endpoints bind: seen as "already in
    use" in tests)."""
    start = _ephemeral_start()
    picks = random.SystemRandom()
    for _ in range(64 if start > _LOWEST_PICK + 1000 else 0):
        port = picks.randrange(_LOWEST_PICK, start)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # no room below the range: the OS picks one
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def child_environment(**extra: str) -> dict[str, str]:
    """This process's environment plus `extra`, with the dir holding `generator/` first on PYTHONPATH, so that a
    `python -m generator...` child imports this same package (the Triton stub, for one, ignores PYTHONPATH)."""
    path = os.pathsep.join(p for p in (_PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}
