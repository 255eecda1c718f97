"""Faults around convert / build / the whole job: killed runs, unwritable or full disks, malformed configs,
sizes of 0, and what the output looks like to a newcomer (one-line errors, clean progress, quoted hints)."""

from __future__ import annotations

import fcntl
import os
import re
import resource
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from generator.cli import main
from tests.convert.test_convert import write_variant

GEN_REPO = str(Path(sys.executable).with_name("gen-repo"))


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output  # stdout and stderr, interleaved as a terminal shows them


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# A convert that stops for good once its staging dir holds a finished rank file, so SIGKILL finds it mid-run.
_HANGING_CONVERT = """
import sys, time
import generator.convert.job as convert
real = convert._convert_ranks
def hang(*args, **kwargs):
    real(*args, **kwargs)
    print("staged", flush=True)
    time.sleep(600)
convert._convert_ranks = hang
convert.convert_checkpoint(convert.ConvertSettings(sys.argv[1], sys.argv[2], progress=False))
"""


def test_sigkill_during_convert_leaves_a_staging_dir_the_next_run_removes(mpt_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ckint"
    process = subprocess.Popen([sys.executable, "-c", _HANGING_CONVERT, str(mpt_dir), str(out)],
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "staged"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    (staging,) = [p for p in tmp_path.iterdir() if p.name.startswith(".ckint.tmp-")]
    assert (staging / "rank0.safetensors").is_file() and not out.exists()

    code, output = _cli("build", "--checkpoint-dir", str(staging), "--output", str(tmp_path / "engine"))
    assert code == 2 and "staging dir of an unfinished `gen-repo convert`" in output
    assert not (tmp_path / "engine").exists()

    code, output = _cli("convert", "--model-dir", str(mpt_dir), "--output", str(out), "--quiet")
    assert code == 0, output
    assert f"removed {staging}" in output
    assert _leftovers(tmp_path) == [] and (out / "rank0.safetensors").is_file()


def test_staging_dirs_of_a_running_convert_are_left_alone(mpt_dir: Path, tmp_path: Path) -> None:
    """Another convert holding the parent dir's lock may own the staging dir: nothing is removed then."""
    busy = tmp_path / ".ckint.tmp-busy01"
    busy.mkdir()
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # what a running convert holds
        code, output = _cli("convert", "--model-dir", str(mpt_dir), "--output", str(tmp_path / "ckint"), "--quiet")
        assert code == 0, output
        assert busy.is_dir() and "removed" not in output
    finally:
        os.close(fd)


@contextmanager
def _read_only(directory: Path) -> Iterator[None]:
    """Make `directory` unwritable, even for root (an immutable attribute), or skip the test."""
    if os.geteuid() != 0:
        directory.chmod(0o555)
        try:
            yield
        finally:
            directory.chmod(0o755)
        return
    if subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode != 0:
        pytest.skip("cannot make a directory read-only here (running as root without chattr +i)")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(directory)], check=True)


def test_read_only_output_is_one_line(mpt_dir: Path, tmp_path: Path) -> None:
    parent = tmp_path / "ro"
    parent.mkdir()
    with _read_only(parent):
        code, output = _cli("convert", "--model-dir", str(mpt_dir), "--output", str(parent / "ckpt"), "--quiet")
    assert code == 2, output
    assert re.fullmatch(r"error: cannot write the checkpoint \S+: (Permission denied|Operation not permitted)"
                        r" \(\S+\)\n", output), output


def _limit_file_size() -> None:
    # a full disk, as the process sees it: writes past 64 KiB fail (EFBIG) instead of killing it (SIGXFSZ)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))


def test_full_disk_is_one_line_and_leaves_nothing(mpt_dir: Path, tmp_path: Path) -> None:
    result = subprocess.run([GEN_REPO, "convert", "--model-dir", str(mpt_dir), "--output", str(tmp_path / "ckpt"),
                             "--workers", "2", "--tp-size", "2"],
                            capture_output=True, text=True, preexec_fn=_limit_file_size, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert re.fullmatch(r"error: cannot write the checkpoint \S+: File too large( \(\S+\))?\n", result.stderr), \
        result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize(("updates", "message"), [
    ({"d_model": "abc"}, "d_model 'abc' is not an integer"),
    ({"n_heads": 0}, "n_heads must be at least 1, got 0"),
    ({"max_seq_len": -5}, "max_seq_len must be at least 1, got -5"),
    ({"n_layers": 2.5}, "n_layers 2.5 is not an integer"),
    ({"expansion_ratio": "four"}, "expansion_ratio 'four' is not a positive number"),
    ({"attn_config": {"attn_type": "grouped_query_attention", "kv_n_heads": 0}},
     "attn_config.kv_n_heads must be at least 1, got 0"),
])
def test_malformed_mpt_config_is_one_line(mpt_dir: Path, tmp_path: Path, updates: dict[str, Any],
                                          message: str) -> None:
    from safetensors.torch import load_file

    model = write_variant(mpt_dir, tmp_path / "hf", updates, load_file(mpt_dir / "model.safetensors"))
    code, output = _cli("convert", "--model-dir", str(model), "--output", str(tmp_path / "ckpt"), "--quiet")
    assert code == 2, output
    assert output.count("\n") == 1 and message in output and "Traceback" not in output
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("flag", ["--tp-size", "--pp-size", "--max-batch-size", "--max-input-len", "--max-seq-len",
                                  "--max-num-tokens", "--workers", "--moe-ep-size"])
def test_whole_job_zero_sizes_are_errors(tmp_path: Path, flag: str) -> None:
    code, output = _cli("--model", "tiny-mpt", "--output", str(tmp_path / "out"), flag, "0")
    assert code == 2, output
    assert f"error: {flag} must be at least 1, got 0" in output
    assert not (tmp_path / "out").exists()


def test_real_preset_without_checkpoint_suggests_hf_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, output = _cli("--model", "mpt-7b", "--output", str(tmp_path / "out"))
    assert code == 2
    assert "`hf download mosaicml/mpt-7b --local-dir DIR`" in output and "huggingface-cli" not in output


def _render_terminal(raw: str) -> list[str]:
    """The lines a terminal shows for `raw`: a carriage return moves back to the line's start, overwriting."""
    lines = []
    for line in raw.split("\n"):
        screen: list[str] = []
        for segment in line.split("\r"):
            segment = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", segment)
            screen[:len(segment)] = list(segment)
        lines.append("".join(screen).rstrip())
    return lines


def _whole_job_output(tmp_path: Path, out: Path, use_pty: bool) -> str:
    # on a terminal, one worker: a single bar line (several stack with cursor moves this test does not emulate)
    args = [GEN_REPO, "--model", "tiny-mpt", "--output", str(out), "--tp-size", "2", "--workers",
            "1" if use_pty else "2"]
    env = {**os.environ, "COLUMNS": "100"}
    if not use_pty:
        return subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                              timeout=600, check=True).stdout
    import pty

    leader, follower = pty.openpty()
    process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, env=env)
    os.close(follower)
    chunks = []
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert process.wait(60) == 0
    return b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")


@pytest.mark.parametrize("use_pty", [False, True], ids=["pipe", "terminal"])
def test_whole_job_output_is_clean_and_the_serve_hint_is_quoted(tmp_path: Path, use_pty: bool) -> None:
    """No half-drawn progress bar beside `done in ...`, in a log or on a terminal; the hint pastes into a shell.
    (A path that needs shell quoting is refused up front: see the next test.)"""
    out = tmp_path / "fine-dir_1.2+x=y@a,b:c%d"
    raw = _whole_job_output(tmp_path, out, use_pty)
    if not use_pty:
        assert "\r" not in raw  # no bars in a log
    shown = _render_terminal(raw)
    done = [line for line in shown if "done in" in line]
    assert len(done) == 4 and all(re.fullmatch(r"      done in \d+\.\d s", line) for line in done), shown
    assert not any("tensor/s" in line or "%|" in line for line in shown), shown
    (hint,) = [line for line in shown if line.startswith("Serve it with:")]
    command = shlex.split(hint.removeprefix("Serve it with:"))
    assert command == ["gen-repo", "serve", "--model-repository", str(out.resolve() / "triton_repo")]


def test_whole_job_refuses_an_unservable_output_path_in_one_line(tmp_path: Path) -> None:
    """tritonserver's python backend cannot load models from a path holding a space or a quote: refused before
    any work, in one line."""
    out = tmp_path / "it's here"
    code, output = _cli("--model", "tiny-mpt", "--output", str(out))
    assert code == 2, output
    assert len(output.strip().splitlines()) == 1, output
    assert "[ ]" in output and "[']" in output and "python backend" in output, output
    assert not out.exists()


def test_whole_job_refuses_what_trtllm_cannot_build_before_converting(mpt_dir: Path, tmp_path: Path) -> None:
    """`--engine tensorrtllm` checks the checkpoint convert would write first: no minutes-long convert (and no
    checkpoint dir) for a model trtllm-build would then refuse."""
    code, output = _cli("--model", str(mpt_dir), "--output", str(tmp_path / "out"), "--engine", "tensorrtllm",
                        "--pp-size", "2")
    assert code == 2, output
    assert "mapping.pp_size 2: TensorRT-LLM's MPT has no pipeline parallelism" in output
    assert not (tmp_path / "out" / "checkpoint").exists()
