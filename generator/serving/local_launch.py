"""A single-host stand-in for `mpirun`, for machines without a working MPI.

It takes the subset of mpirun's command line that `gen-repo serve` writes (`-x NAME[=VALUE]` options, then
`-n 1 COMMAND ... : -n 1 COMMAND ...` blocks), starts one process per block with the rank variables torchrun
uses (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, which the pytorch engine reads when no MPI variables are set), passes
SIGINT/SIGTERM on to every rank, and ends them all as soon as one exits, like mpirun does.

    python -m generator.serving.local_launch -x MASTER_ADDR=127.0.0.1 -x MASTER_PORT=29500 \\
        -n 1 tritonserver ... : -n 1 tritonserver --model-control-mode=explicit ...
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from types import FrameType

from generator.serving.supervise import child_preexec

#: mpirun flags that take no value here and mean nothing on one host
_IGNORED_FLAGS = ("--allow-run-as-root", "--oversubscribe")


def parse_command_line(argv: list[str]) -> tuple[dict[str, str], list[list[str]]]:
    """Split an mpirun-style command line into the environment it sets and one argv per rank."""
    env: dict[str, str] = {}
    index = 0
    while index < len(argv) and argv[index] != "-n":
        flag = argv[index]
        if flag == "-x" and index + 1 < len(argv):
            name, _, value = argv[index + 1].partition("=")
            env[name] = value if "=" in argv[index + 1] else os.environ.get(name, "")
            index += 2
        elif flag in _IGNORED_FLAGS:
            index += 1
        else:
            raise SystemExit(f"local_launch: unsupported option {flag!r}")
    blocks: list[list[str]] = []
    for block in _split(argv[index:], ":"):
        if len(block) < 3 or block[0] != "-n":
            raise SystemExit(f"local_launch: each block must be `-n COUNT COMMAND ...`, got {block!r}")
        blocks += [block[2:]] * int(block[1])
    if not blocks:
        raise SystemExit("local_launch: no command to run")
    return env, blocks


def _split(items: list[str], separator: str) -> list[list[str]]:
    groups: list[list[str]] = [[]]
    for item in items:
        if item == separator:
            groups.append([])
        else:
            groups[-1].append(item)
    return [group for group in groups if group]


def main(argv: list[str] | None = None) -> int:
    """Run every rank; return the first non-zero exit code (0 when all ranks end cleanly)."""
    extra_env, commands = parse_command_line(sys.argv[1:] if argv is None else argv)
    world_size = len(commands)
    processes: list[subprocess.Popen[bytes]] = []
    for rank, command in enumerate(commands):
        env = {**os.environ, **extra_env, "RANK": str(rank), "WORLD_SIZE": str(world_size),
               "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world_size)}
        # a rank gets SIGTERM when this launcher dies (kill -9 included), as mpirun's ranks do
        processes.append(subprocess.Popen(command, env=env, preexec_fn=child_preexec(os.getpid())))

    def forward(signum: int, frame: FrameType | None) -> None:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    # Like mpirun: once one rank ends, the job is over.
    while all(process.poll() is None for process in processes):
        time.sleep(0.2)
    forward(signal.SIGTERM, None)
    deadline = time.monotonic() + 20
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    codes = [process.returncode for process in processes]
    return next((code for code in codes if code), 0)


if __name__ == "__main__":
    sys.exit(main())
