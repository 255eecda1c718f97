"""Keeping a started tritonserver and everything it starts under control (Linux /proc based).

- children die with their parent: `child_preexec` gives tritonserver a parent-death signal (SIGTERM, so it still
  shuts its python stubs down cleanly) and makes it ignore SIGPIPE (its output goes through our log pump);
- ports are checked free before a start, and the server that answers readiness must be ours (`listener_pids`);
- the python backend stubs of a running server are watched (`StubWatch`): tritonserver itself never notices a
  dead stub until a request fails, and keeps reporting ready;
- the /dev/shm region of every stub is remembered, so that a forced stop can remove what it leaves behind;
- the server's output is copied to its log file by a thread (`start_log_pump`) that drops the CUDA error lines a
  CPU-only host always prints at start (they are expected there and only frighten);
- a model's load error is found in the log and shown as one line (`load_failures`).
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from generator.errors import GenRepoError

PR_SET_PDEATHSIG = 1
STUB_COMM = "triton_python_b"     # /proc/<pid>/comm of triton_python_backend_stub (truncated to 15 characters)

# What tritonserver 2.51 (a CUDA build) prints on a host without a GPU driver although nothing is wrong.
CPU_ONLY_NOISE = (
    re.compile(r'server\.cc:\d+\] "CudaDriverHelper has not been initialized\."'),
    re.compile(r'ensemble_scheduler\.cc:\d+\] "unable to create stream for ensemble: CUDA driver version is '
               r'insufficient for CUDA runtime version"'),
)
_FAILED_LOAD = re.compile(r"failed to load '([^']+)' version \d+: (.*)")


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC = _libc()


def child_preexec(parent_pid: int, death_signal: signal.Signals = signal.SIGTERM) -> Callable[[], None]:
    """A `preexec_fn`: the child gets `death_signal` when this process dies, and ignores SIGPIPE.

    Linux sends the parent-death signal when the *thread* that forked exits, so it is only set up when called
    from the main thread. Resolved here, in the parent: the child must not load libraries between fork and exec."""
    prctl = getattr(_LIBC, "prctl", None) if threading.current_thread() is threading.main_thread() else None
    set_handler = getattr(_LIBC, "signal", None)
    if set_handler is not None:
        set_handler.argtypes = [ctypes.c_int, ctypes.c_void_p]
        set_handler.restype = ctypes.c_void_p

    def preexec() -> None:
        if set_handler is not None:
            set_handler(int(signal.SIGPIPE), 1)  # SIG_IGN survives exec: a closed log pipe gives EPIPE, not death
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, int(death_signal), 0, 0, 0)
            if os.getppid() != parent_pid:  # the parent died before prctl took effect
                os.kill(os.getpid(), death_signal)
    return preexec


# ports ------------------------------------------------------------------------------------------------------
def listener_pids(port: int) -> set[int] | None:
    """Pids of the processes holding a listening TCP socket on `port`; None when /proc cannot tell.

    Processes of other users whose fds cannot be read are missing from the set."""
    inodes: set[str] = set()
    readable = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        readable = True
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    if not readable:
        return None
    targets = {f"socket:[{inode}]" for inode in inodes}
    pids: set[int] = set()
    if not targets:
        return pids
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                if os.readlink(fd) in targets:
                    pids.add(int(entry.name))
                    break
        except OSError:
            continue
    return pids


def describe_pids(pids: set[int]) -> str:
    """'pid 12 (tritonserver), pid 13 (python)'."""
    shown = []
    for pid in sorted(pids):
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            name = "?"
        shown.append(f"pid {pid} ({name})")
    return ", ".join(shown)


def check_ports_free(host: str, ports: dict[str, int]) -> None:
    """Raise `GenRepoError` naming the first port (and its option and holder) that cannot be bound on `host`."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for option, port in ports.items():
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT of an earlier server is fine
            try:
                sock.bind((host, port))
            except OSError as error:
                holders = listener_pids(port)
                held = f" by {describe_pids(holders)}" if holders else ""
                raise GenRepoError(f"port {port} ({option}) on {host} is in use{held} ({error.strerror}): stop "
                                   f"what holds it (an earlier server?) or pass another {option}") from None


# python stubs -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stub:
    """A python backend stub: its pid, the model it runs and its /dev/shm region."""

    pid: int
    model: str
    region: str


def session_stubs(session_id: int) -> list[Stub]:
    """The python backend stubs in session `session_id` (the argv of a stub is `stub <model.py> <region> ...`)."""
    stubs = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getsid(int(entry.name)) != session_id or (entry / "comm").read_text().strip() != STUB_COMM:
                continue
            args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if len(args) > 2:
            stubs.append(Stub(int(entry.name), Path(args[1]).parent.parent.name, args[2]))
    return stubs


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


_REGIONS: dict[int, set[str]] = {}   # server pid -> /dev/shm regions its stubs were seen with
_REGIONS_LOCK = threading.Lock()


def remember_stubs(server_pid: int) -> list[Stub]:
    """The stubs of the server's session now; their regions are remembered for `forget_regions`."""
    stubs = session_stubs(server_pid)
    with _REGIONS_LOCK:
        _REGIONS.setdefault(server_pid, set()).update(stub.region for stub in stubs)
    return stubs


def forget_regions(server_pid: int, remove: bool, shm_dir: Path = Path("/dev/shm")) -> list[str]:
    """Drop what was remembered for the server; with `remove`, delete those regions that still exist."""
    with _REGIONS_LOCK:
        regions = _REGIONS.pop(server_pid, set())
    removed = []
    for region in sorted(regions) if remove else []:
        if "/" in region or not region:
            continue
        try:
            (shm_dir / region).unlink()
            removed.append(region)
        except OSError:
            continue
    return removed


class StubWatch:
    """Notices python stubs of a server that died (kill -9, OOM killer) while the server lives on."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self.stubs = {stub.pid: stub for stub in remember_stubs(server_pid)}

    def dead(self) -> list[Stub]:
        """Stubs seen before that are gone now (new stubs are watched from now on)."""
        gone = [stub for pid, stub in self.stubs.items() if not alive(pid)]
        for stub in remember_stubs(self.server_pid):
            self.stubs.setdefault(stub.pid, stub)
        return gone


# log ----------------------------------------------------------------------------------------------------------
_PUMPS: dict[int, threading.Thread] = {}


def start_log_pump(server_pid: int, stream: IO[bytes], log: IO[bytes],
                   drop: tuple[re.Pattern[str], ...] = ()) -> threading.Thread:
    """Copy the server's output to `log` line by line (flushed), leaving out lines matching `drop`."""
    def pump() -> None:
        with stream, log:
            for line in iter(stream.readline, b""):
                if drop and any(pattern.search(line.decode(errors="replace")) for pattern in drop):
                    continue
                log.write(line)
                log.flush()
    thread = threading.Thread(target=pump, name=f"tritonserver-log-{server_pid}", daemon=True)
    thread.start()
    _PUMPS[server_pid] = thread
    return thread


def finish_log_pump(server_pid: int, timeout_s: float = 2.0) -> None:
    """Wait for the server's log to be written out (the pipe ends when the last process holding it exits)."""
    thread = _PUMPS.pop(server_pid, None)
    if thread is not None:
        thread.join(timeout_s)


def load_failures(log_file: Path | None) -> list[str]:
    """One line per model that failed to load: "model 'x' failed to load: <first line of the error>"."""
    if log_file is None or not log_file.is_file():
        return []
    found: dict[str, str] = {}
    for line in log_file.read_text(errors="replace").splitlines():
        match = _FAILED_LOAD.search(line)
        if match and match.group(1) not in found:
            message = match.group(2).split("\\n")[0].rstrip('"').strip()
            found[match.group(1)] = f"model '{match.group(1)}' failed to load: {message}"
    return list(found.values())
