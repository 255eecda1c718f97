"""Joining an engine's ranks: check the launch has the engine's world size, agree on the rendezvous, and let
ranks > 0 follow rank 0. Shared by `gen-repo run` and `gen-repo eval` (mpi4py is used here only, never inside
tritonserver's stubs)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from generator.engine.rank_env import free_port
from generator.errors import ConfigError, GenRepoError

if TYPE_CHECKING:
    from generator.engine.config import EngineConfig


def ensure_rendezvous(world_size: int) -> None:
    """Set MASTER_ADDR / MASTER_PORT for a multi-rank run when the launcher did not (agreed over MPI)."""
    if world_size <= 1 or "MASTER_PORT" in os.environ:
        return
    try:
        from mpi4py import MPI
    except ImportError as error:
        raise GenRepoError("a multi-rank run needs MASTER_ADDR/MASTER_PORT or mpi4py to agree on them") from error
    comm = MPI.COMM_WORLD
    # one host unless the user says otherwise (multi-node launches set MASTER_ADDR themselves)
    address = os.environ.get("MASTER_ADDR") or "127.0.0.1"
    port, address = comm.bcast((free_port(), address) if comm.Get_rank() == 0 else None, root=0)
    os.environ["MASTER_ADDR"] = str(address)
    os.environ["MASTER_PORT"] = str(port)


def join_engine_ranks(engine_dir: Path, device: str | None, command: str) -> EngineConfig | None:
    """Check this launch has the engine's world size and set up the rendezvous. Rank 0 gets the engine's config
    back; ranks > 0 follow rank 0's engine until it shuts down, then get None."""
    from generator.engine import follow
    from generator.engine.config import load_engine_config
    from generator.engine.rank_env import process_info

    info = process_info()
    config = load_engine_config(engine_dir)
    if info.world_size != config.world_size:
        raise ConfigError(f"the engine has {config.world_size} ranks (tp {config.mapping.tensor_parallel_size} x "
                          f"pp {config.mapping.pipeline_parallel_size}); run it with `mpirun -n "
                          f"{config.world_size} gen-repo {command} ...` (this launch has {info.world_size})")
    ensure_rendezvous(info.world_size)
    if info.rank != 0:
        follow(engine_dir, device=device)
        return None
    return config
