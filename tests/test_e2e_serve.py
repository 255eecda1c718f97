"""`gen-repo serve` / `gen-repo infer` as a user runs them: real processes, signals and exit codes."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from generator.pipeline import PipelineResult
from generator.serving.serve import free_port
from tests.factories import hf_greedy

pytestmark = pytest.mark.server

GEN_REPO = [sys.executable, "-m", "generator"]


def _wait_for_line(process: subprocess.Popen[str], pattern: str, timeout_s: float) -> str:
    """Read the process's stdout until a line matches `pattern`; fail with what it printed otherwise."""
    seen = []
    deadline = time.monotonic() + timeout_s
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        seen.append(line)
        if re.search(pattern, line):
            return line
    raise AssertionError(f"no line matching {pattern!r}; output:\n{''.join(seen)}")


def test_serve_then_infer_then_sigterm(tiny_mpt_job: PipelineResult, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    server = subprocess.Popen(
        [*GEN_REPO, "serve", "--model-repository", str(tiny_mpt_job.triton_repo), "--http-port", str(http_port),
         "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port), "--log-file", str(tmp_path / "log")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        ready = _wait_for_line(server, r"^ready:", 300)
        assert f"127.0.0.1:{grpc_port}" in ready and "/metrics" in ready
        prompt = "Tell me a story about a robot."
        tokenizer = AutoTokenizer.from_pretrained(tiny_mpt_job.hf_dir)
        expected = tokenizer.decode(hf_greedy(tiny_mpt_job.hf_dir, [tokenizer.encode(prompt)], 10)[0])
        for extra in ([], ["--stream"], ["--protocol", "http", "--url", f"127.0.0.1:{http_port}"]):
            url = [] if "--url" in extra else ["--url", f"127.0.0.1:{grpc_port}"]
            answer = subprocess.run([*GEN_REPO, "infer", prompt, "--max-tokens", "10", "--exclude-input-in-output",
                                     *url, *extra], capture_output=True, text=True, timeout=120)
            assert answer.returncode == 0, answer.stderr
            assert answer.stdout == expected + "\n"
        _assert_stops_cleanly(server, signal.SIGTERM, http_port)
    finally:
        _kill_if_running(server)


def test_serve_reports_a_server_that_dies_while_loading(tiny_mpt_job: PipelineResult, tmp_path: Path) -> None:
    repository = tmp_path / "triton_repo"
    shutil.copytree(tiny_mpt_job.triton_repo, repository)
    config = repository / "tensorrt_llm" / "config.pbtxt"
    config.write_text(config.read_text().replace(str(tiny_mpt_job.engine_dir), str(tmp_path / "no-engine")))
    server = subprocess.Popen(
        [*GEN_REPO, "serve", "--model-repository", str(repository), "--http-port", str(free_port()),
         "--grpc-port", str(free_port()), "--metrics-port", str(free_port()), "--log-file", str(tmp_path / "log")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    _, stderr = server.communicate(timeout=300)
    assert server.returncode == 2
    assert "exited with code" in stderr and "before it was ready" in stderr
    assert "tensorrt_llm" in stderr  # the log tail names the model that failed


def test_ctrl_c_stops_the_server_cleanly(tiny_mpt_job: PipelineResult, tmp_path: Path) -> None:
    http_port = free_port()
    server = subprocess.Popen(
        [*GEN_REPO, "serve", "--model-repository", str(tiny_mpt_job.triton_repo), "--http-port", str(http_port),
         "--grpc-port", str(free_port()), "--metrics-port", str(free_port()), "--log-file", str(tmp_path / "log")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        _wait_for_line(server, r"^ready:", 300)
        _assert_stops_cleanly(server, signal.SIGINT, http_port)
    finally:
        _kill_if_running(server)


def _assert_stops_cleanly(server: subprocess.Popen[str], sig: signal.Signals, http_port: int) -> None:
    """`sig` stops `gen-repo serve` with exit 0, and the HTTP port is free again: nothing of the server survived."""
    server.send_signal(sig)
    assert server.wait(timeout=60) == 0
    assert server.stdout is not None
    assert "stopped" in server.stdout.read()
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is fine, a listener is not
        sock.bind(("127.0.0.1", http_port))


def _kill_if_running(server: subprocess.Popen[str]) -> None:
    if server.poll() is None:
        server.kill()
        server.wait()
