"""Rank, world size and local rank of this process, from the launcher's environment (mpirun, MPICH, torchrun or
`generator.serving.local_launch`). No torch here: the Triton stub reads it before it knows whether to load one."""

from __future__ import annotations

import os
from dataclasses import dataclass

_RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "RANK")
_SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "WORLD_SIZE")
_LOCAL_RANK_VARIABLES = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "LOCAL_RANK")


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
