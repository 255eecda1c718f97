"""The command line: help for every command, exit code 2 with a message for user errors, serve --dry-run."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from generator.cli import main


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes is not None else "")


def test_every_command_has_help() -> None:
    code, output = _run("--help")
    assert code == 0 and "--model" in output
    for command in main.commands:
        code, output = _run(command, "--help")
        assert code == 0, (command, output)
        assert "usage:" in output.lower()


def test_unknown_preset_exits_2_with_the_list_of_presets(tmp_path: Path) -> None:
    code, output = _run("--model", "gpt-17", "--output", str(tmp_path / "out"))
    assert code == 2
    assert "unknown preset 'gpt-17'" in output and "tiny-mpt" in output and "dbrx-instruct" in output
    assert "Traceback" not in output
    assert not (tmp_path / "out" / "checkpoint").exists()


def test_missing_model_dir_exits_2(tmp_path: Path) -> None:
    code, output = _run("--model", str(tmp_path / "nothing-here"), "--output", str(tmp_path / "out"))
    assert code == 2 and "no such directory" in output


def test_real_preset_offline_exits_2_with_how_to(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, output = _run("--model", "dbrx-instruct", "--output", str(tmp_path / "out"))
    assert code == 2 and "--model-dir" in output


def test_models_lists_presets_with_sizes() -> None:
    code, output = _run("models")
    assert code == 0
    assert "mpt-7b" in output and "6.65B" in output and "bfloat16" in output and "int4_wo" in output


def test_serve_dry_run_single_rank(tmp_path: Path) -> None:
    code, output = _run("serve", "--model-repository", str(tmp_path), "--dry-run", "--http-port", "18000",
                        "--grpc-port", "18001", "--metrics-port", "18002")
    assert code == 0, output
    argv = shlex.split(output.splitlines()[-1])
    assert Path(argv[0]).name == "tritonserver"
    assert f"--model-repository={tmp_path.resolve()}" in argv
    assert {"--http-port=18000", "--grpc-port=18001", "--metrics-port=18002", "--http-address=127.0.0.1",
            "--grpc-address=127.0.0.1", "--disable-auto-complete-config"} <= set(argv)


def test_serve_dry_run_world_size_2_is_leader_mode(tmp_path: Path) -> None:
    code, output = _run("serve", "--model-repository", str(tmp_path), "--dry-run", "--world-size", "2")
    assert code == 0, output
    argv = shlex.split(output.splitlines()[-1])
    assert Path(argv[0]).name == "mpirun" and "--allow-run-as-root" in argv
    ranks = " ".join(argv).split(" : ")
    assert len(ranks) == 2
    assert "shm-region-prefix-name=prefix0_" in ranks[0] and "--load-model" not in ranks[0]
    assert "shm-region-prefix-name=prefix1_" in ranks[1]
    assert "--model-control-mode=explicit" in ranks[1] and "--load-model=tensorrt_llm" in ranks[1]
    assert "MASTER_ADDR=127.0.0.1" in argv and any(a.startswith("MASTER_PORT=") for a in argv)


def test_serve_missing_repository_is_a_usage_error(tmp_path: Path) -> None:
    code, output = _run("serve", "--model-repository", str(tmp_path / "missing"))
    assert code == 2 and "does not exist" in output


def test_infer_without_a_server_exits_2_quickly() -> None:
    from generator.serving.serve import free_port

    code, output = _run("infer", "hello", "--protocol", "http", "--url", f"127.0.0.1:{free_port()}",
                        "--timeout", "5")
    assert code == 2 and "cannot reach" in output
