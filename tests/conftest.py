"""Session fixtures: the tiny-mpt whole job (run once) and one tritonserver serving it (started once).

Tests that need the server are marked `server`; `pytest -m "not server"` skips them (and the start-up).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from generator.pipeline import PipelineResult, PipelineSettings, run_pipeline
from generator.serving.serve import ServeSettings, free_port, start_server, stop_server, wait_until_ready
from tests.factories import make_dbrx, make_mpt

SERVER_READY_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class RunningServer:
    """A tritonserver started by the tests: where to reach it and what it serves."""

    job: PipelineResult
    http_url: str            # host:port
    grpc_url: str            # host:port
    metrics_url: str         # http://host:port/metrics
    log_file: Path
    shm_prefix: str          # pass to stop_server so leftover /dev/shm regions go too


def _quiet(_: str) -> None:
    """Pipeline progress goes nowhere in tests."""


def run_tiny_job(model: str, output_dir: Path, **overrides: Any) -> PipelineResult:
    """Run the whole job for a tiny preset (progress lines discarded)."""
    return run_pipeline(PipelineSettings(model=model, output_dir=output_dir, progress=False, **overrides),
                        echo=_quiet)


def start_test_server(job: PipelineResult, log_file: Path) -> tuple[RunningServer, subprocess.Popen[bytes]]:
    """Start tritonserver on `job`'s repository on free loopback ports and wait until it is ready."""
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    settings = ServeSettings(model_repository=job.triton_repo, http_port=http_port, grpc_port=grpc_port,
                             metrics_port=metrics_port, log_file=log_file,
                             shm_prefix=f"gen-repo-test-{os.getpid()}-{http_port}-")
    process, log = start_server(settings)
    try:
        wait_until_ready(process, settings.host, http_port, SERVER_READY_TIMEOUT_S, log)
    except BaseException:
        stop_server(process, shm_prefix=settings.shm_prefix)
        raise
    server = RunningServer(job=job, http_url=f"127.0.0.1:{http_port}", grpc_url=f"127.0.0.1:{grpc_port}",
                           metrics_url=f"http://127.0.0.1:{metrics_port}/metrics", log_file=log,
                           shm_prefix=settings.shm_prefix)
    return server, process


@pytest.fixture(scope="session")
def tiny_mpt_job(tmp_path_factory: pytest.TempPathFactory) -> PipelineResult:
    """`gen-repo --model tiny-mpt --output <tmp>` (float32), run once per session."""
    return run_tiny_job("tiny-mpt", tmp_path_factory.mktemp("tiny-mpt-job"))


@pytest.fixture(scope="session")
def triton_server(tiny_mpt_job: PipelineResult, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One tritonserver serving the tiny-mpt repository for the whole session."""
    log_file = tmp_path_factory.mktemp("tritonserver") / "tritonserver.log"
    server, process = start_test_server(tiny_mpt_job, log_file)
    try:
        yield server
    finally:
        stop_server(process, shm_prefix=server.shm_prefix)


@pytest.fixture(scope="session")
def mpt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random HF MPT checkpoint (read-only: tests copy it before changing anything)."""
    return make_mpt(tmp_path_factory.mktemp("hf") / "mpt")


@pytest.fixture(scope="session")
def dbrx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random HF DBRX checkpoint (read-only)."""
    return make_dbrx(tmp_path_factory.mktemp("hf") / "dbrx")
