"""The launch lines of `gen-repo serve --dry-run` for world sizes 1, 2, 4 and 8.

Reference: TensorRT-LLM's `triton_backend/scripts/launch_triton_server.py` (leader mode): one
`mpirun --allow-run-as-root` with a `-n 1 tritonserver ...` block per rank, every rank with the same ports,
`--disable-auto-complete-config` and its own `--backend-config=python,shm-region-prefix-name=prefix{rank}_`;
ranks > 0 add `--model-control-mode=explicit --load-model=tensorrt_llm`. gen-repo's line is compared twice:
literally, and block by block against the flags that script would pass.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from generator.cli import main
from generator.serving.serve import detect_cpu_only

CPU_ONLY_FLAGS = ["--allow-gpu-metrics=false", "--pinned-memory-pool-byte-size=0", "--cuda-memory-pool-byte-size=0:0"]
# gen-repo's own stop timeout (tritonserver's default of 30 s makes Ctrl-C hang behind a stuck request)
EXIT_TIMEOUT_FLAG = "--exit-timeout-secs=5"


def dry_run_lines(args: list[str]) -> tuple[str, str, str]:
    """`gen-repo serve ... --dry-run`: (the launch form comment, the environment line, the command line)."""
    result = CliRunner().invoke(main, ["serve", *args, "--dry-run"])
    assert result.exit_code == 0, result.output
    form_line, env_line, command_line = result.output.strip().splitlines()
    assert form_line.startswith("# launch_triton_server.py ")
    return form_line, env_line, command_line


def make_repository(root: Path, world_size: int) -> Path:
    """A repository whose tensorrt_llm model names an engine dir of `world_size` ranks (config files only)."""
    engine = root / "engine"
    engine.mkdir(parents=True)
    (engine / "config.json").write_text(json.dumps({
        "version": "1.2.1", "build_config": {"max_batch_size": 8},
        "pretrained_config": {"architecture": "MPTForCausalLM", "dtype": "float16",
                              "mapping": {"world_size": world_size, "tp_size": world_size, "pp_size": 1}}}))
    model = root / "triton_repo" / "tensorrt_llm"
    model.mkdir(parents=True)
    (model / "config.pbtxt").write_text(
        'name: "tensorrt_llm"\nbackend: "tensorrtllm"\nmax_batch_size: 8\n'
        f'parameters: {{ key: "gpt_model_path", value: {{ string_value: "{engine}" }} }}\n')
    return root / "triton_repo"


def dry_run_argv(repository: Path, triton_bin: Path) -> list[str]:
    """The argv `gen-repo serve --dry-run` prints (its last line; before it the form and the environment)."""
    _, env_line, command_line = dry_run_lines(["--model-repository", str(repository), "--triton-bin",
                                               str(triton_bin)])
    assert env_line.startswith("PATH=") and " LD_LIBRARY_PATH=" in env_line
    return shlex.split(command_line)


def anchor_rank_flags(rank: int, repository: Path) -> set[str]:
    """The flags launch_triton_server.py gives rank `rank` (its block lists the ports twice; a set drops that)."""
    flags = {f"--model-repository={repository}", "--grpc-port=8001", "--http-port=8000", "--metrics-port=8002",
             "--disable-auto-complete-config", f"--backend-config=python,shm-region-prefix-name=prefix{rank}_"}
    if rank != 0:
        flags |= {"--model-control-mode=explicit", "--load-model=tensorrt_llm"}
    return flags


def rank_blocks(argv: list[str]) -> tuple[list[str], list[list[str]]]:
    """Split an MPMD mpirun line into its global options and its per-rank blocks (without `-n 1`)."""
    first = argv.index("-n")
    blocks: list[list[str]] = [[]]
    for word in argv[first:]:
        if word == ":":
            blocks.append([])
        else:
            blocks[-1].append(word)
    for block in blocks:
        assert block[:2] == ["-n", "1"]
    return argv[:first], [block[2:] for block in blocks]


@pytest.fixture()
def triton_bin(tmp_path: Path) -> Path:
    binary = tmp_path / "bin" / "tritonserver"
    binary.parent.mkdir()
    binary.write_text("#!/bin/sh\nexit 1\n")
    binary.chmod(0o755)
    return binary


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_serve_dry_run_launch_line(tmp_path: Path, triton_bin: Path, world_size: int) -> None:
    repository = make_repository(tmp_path, world_size)
    argv = dry_run_argv(repository, triton_bin)
    cpu_flags = CPU_ONLY_FLAGS if detect_cpu_only() else []

    def rank_args(rank: int | None) -> list[str]:
        args = [str(triton_bin), f"--model-repository={repository.resolve()}", "--http-address=127.0.0.1",
                "--grpc-address=127.0.0.1", "--http-port=8000", "--grpc-port=8001", "--metrics-port=8002",
                "--disable-auto-complete-config", EXIT_TIMEOUT_FLAG, *cpu_flags]
        if rank is not None:
            args.append(f"--backend-config=python,shm-region-prefix-name=prefix{rank}_")
            if rank > 0:
                args += ["--model-control-mode=explicit", "--load-model=tensorrt_llm"]
        return args

    if world_size == 1:
        # one process, no mpirun (launch_triton_server.py's --no-mpi form)
        assert argv == rank_args(None)
        return
    master_port = argv[argv.index("-x", argv.index("MASTER_ADDR=127.0.0.1")) + 1]
    assert master_port.startswith("MASTER_PORT=") and int(master_port.split("=")[1]) > 0
    expected = [str(Path(sys.prefix) / "bin" / "mpirun"), "--allow-run-as-root"]
    if world_size > (os.cpu_count() or 1):
        expected.append("--oversubscribe")
    expected += ["-x", "MASTER_ADDR=127.0.0.1", "-x", master_port, "-x", "PATH", "-x", "LD_LIBRARY_PATH"]
    for rank in range(world_size):
        expected += ["-n", "1", *rank_args(rank)] + ([":"] if rank < world_size - 1 else [])
    assert argv == expected


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_leader_mode_matches_launch_triton_server(tmp_path: Path, triton_bin: Path, world_size: int) -> None:
    """Each rank's block carries every flag launch_triton_server.py gives that rank; what gen-repo adds is
    only the bind addresses, CPU-only memory settings and the rendezvous variables for the pytorch engine."""
    repository = make_repository(tmp_path, world_size)
    argv = dry_run_argv(repository, triton_bin)
    global_options, blocks = rank_blocks(argv)
    assert global_options[1] == "--allow-run-as-root" and Path(global_options[0]).name == "mpirun"
    assert len(blocks) == world_size
    allowed_extras = {"--http-address=127.0.0.1", "--grpc-address=127.0.0.1", EXIT_TIMEOUT_FLAG, *CPU_ONLY_FLAGS}
    for rank, block in enumerate(blocks):
        assert block[0] == str(triton_bin)
        flags = set(block[1:])
        anchor = anchor_rank_flags(rank, repository.resolve())
        assert anchor <= flags, f"rank {rank} lacks {anchor - flags}"
        assert flags - anchor <= allowed_extras, f"rank {rank} adds {flags - anchor - allowed_extras}"
    # only rank 0 loads the whole repository (and so serves HTTP/gRPC)
    assert ["--load-model=tensorrt_llm" in block for block in blocks] == [False] + [True] * (world_size - 1)


def anchor_multi_model_flags(gpus: int) -> list[str]:
    """What launch_triton_server.py --multi-model adds on Triton > 24.06 (add_multi_model_config)."""
    return ["--pinned-memory-pool-byte-size=0", "--enable-peer-access=false",
            *(f"--cuda-memory-pool-byte-size={gpu}:0" for gpu in range(gpus))]


@pytest.mark.parametrize("gpus", [1, 4])
def test_multi_model_is_one_server_in_orchestrator_mode(tmp_path: Path, triton_bin: Path, gpus: int,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """launch_triton_server.py --multi-model: one tritonserver with TRTLLM_ORCHESTRATOR=1 and
    TRTLLM_ORCHESTRATOR_SPAWN_PROCESSES=1 (the backend spawns the ranks), no pinned pool, no peer access and a
    zero CUDA pool on every GPU."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", ",".join(str(gpu) for gpu in range(gpus)))
    monkeypatch.delenv("NVIDIA_TRITON_SERVER_VERSION", raising=False)
    repository = make_repository(tmp_path, world_size=4)
    form, env_line, command_line = dry_run_lines(["--model-repository", str(repository), "--triton-bin",
                                                  str(triton_bin), "--multi-model"])
    assert "--multi-model --no-mpi form" in form
    assert env_line.endswith(" TRTLLM_ORCHESTRATOR=1 TRTLLM_ORCHESTRATOR_SPAWN_PROCESSES=1 \\")
    argv = shlex.split(command_line)
    assert argv[0] == str(triton_bin) and "mpirun" not in command_line and ":" not in argv
    for flag in anchor_multi_model_flags(gpus):
        assert argv.count(flag) == 1, (flag, argv)


def test_multi_model_flags_follow_the_triton_version(tmp_path: Path, triton_bin: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Like the anchor, Triton 24.06 and older get no orchestrator memory flags (newer ones do)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    repository = make_repository(tmp_path, world_size=2)
    args = ["--model-repository", str(repository), "--triton-bin", str(triton_bin), "--multi-model"]
    monkeypatch.setenv("NVIDIA_TRITON_SERVER_VERSION", "24.06")
    assert "--enable-peer-access=false" not in dry_run_lines(args)[2]
    monkeypatch.setenv("NVIDIA_TRITON_SERVER_VERSION", "26.07")
    argv = shlex.split(dry_run_lines(args)[2])
    assert all(argv.count(flag) == 1 for flag in anchor_multi_model_flags(2)), argv


def test_multi_model_without_spawning_is_leader_mode(tmp_path: Path, triton_bin: Path) -> None:
    """--disable-spawn-processes: mpirun starts the ranks, TRTLLM_ORCHESTRATOR_SPAWN_PROCESSES=0, no memory flags."""
    repository = make_repository(tmp_path, world_size=2)
    form, env_line, command_line = dry_run_lines(["--model-repository", str(repository), "--triton-bin",
                                                  str(triton_bin), "--multi-model", "--disable-spawn-processes"])
    assert "--disable-spawn-processes" in form
    assert env_line.endswith(" TRTLLM_ORCHESTRATOR=1 TRTLLM_ORCHESTRATOR_SPAWN_PROCESSES=0 \\")
    global_options, blocks = rank_blocks(shlex.split(command_line))
    assert Path(global_options[0]).name == "mpirun" and len(blocks) == 2
    assert "--enable-peer-access=false" not in command_line


def test_dry_run_names_the_launch_form(tmp_path: Path, triton_bin: Path) -> None:
    """World size 1 follows launch_triton_server.py's --no-mpi form; larger ones its leader mode."""
    for world_size, expected in ((1, "--no-mpi form (world size 1)"), (2, "leader mode (world size 2)")):
        repository = make_repository(tmp_path / str(world_size), world_size)
        form, _, _ = dry_run_lines(["--model-repository", str(repository), "--triton-bin", str(triton_bin)])
        assert expected in form, form


def test_multi_model_refuses_the_pytorch_engine(tmp_path: Path) -> None:
    repository = make_repository(tmp_path, world_size=2)
    config = repository / "tensorrt_llm" / "config.pbtxt"
    config.write_text(config.read_text().replace('backend: "tensorrtllm"', 'backend: "python"'))
    triton_bin = tmp_path / "tritonserver"
    triton_bin.write_text("")
    result = CliRunner().invoke(main, ["serve", "--model-repository", str(repository), "--triton-bin",
                                       str(triton_bin), "--multi-model", "--dry-run"])
    assert result.exit_code == 2 and "orchestrator mode" in result.output


def test_ranks_above_zero_load_every_named_engine_model(tmp_path: Path) -> None:
    repository = make_repository(tmp_path, world_size=2)
    triton_bin = tmp_path / "tritonserver"
    triton_bin.write_text("")
    result = CliRunner().invoke(main, ["serve", "--model-repository", str(repository), "--triton-bin",
                                       str(triton_bin), "--tensorrt-llm-model-name", "tensorrt_llm,other_llm",
                                       "--dry-run"])
    assert result.exit_code == 0, result.output
    blocks = " ".join(shlex.split(result.output.strip().splitlines()[-1])).split(" : ")
    assert "--load-model=tensorrt_llm --load-model=other_llm" in blocks[1]
    assert "--load-model" not in blocks[0]
