"""Regression: many short requests while the cancellation watcher polls every millisecond.

tritonserver 2.51 crashes (SIGSEGV in TRITONBACKEND_ResponseFactoryIsCancelled) when a python model asks a
request `is_cancelled()` after its FINAL response went out. The `tensorrt_llm` model once did exactly that from
its watcher thread, racing the step loop; under load it took the whole server down.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from pathlib import Path

import numpy as np
import pytest

from generator.pipeline import PipelineResult
from generator.serving.render import Batching, RenderSettings, render_repository
from generator.serving.serve import stop_server
from tests.conftest import start_test_server

pytestmark = pytest.mark.server

CLIENTS = 4
REQUESTS_PER_CLIENT = 400


def _short_requests(url: str, count: int, errors: list[str]) -> None:
    """`count` one- or two-token requests, one after the other, on one gRPC stream."""
    import tritonclient.grpc as grpcclient

    responses: queue.Queue[tuple[object, object]] = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        for index in range(count):
            inputs = []
            for name, value in (("input_ids", np.array([[5, 6, 7]], np.int32)),
                                ("input_lengths", np.array([[3]], np.int32)),
                                ("request_output_len", np.array([[1 + index % 2]], np.int32))):
                tensor = grpcclient.InferInput(name, list(value.shape), "INT32")
                tensor.set_data_from_numpy(value)
                inputs.append(tensor)
            client.async_stream_infer("tensorrt_llm", inputs, enable_empty_final_response=True)
            while True:
                result, error = responses.get(timeout=60)
                if error is not None:
                    errors.append(str(error))
                    return
                if result.get_response().parameters["triton_final_response"].bool_param:  # type: ignore[attr-defined]
                    break
    finally:
        client.stop_stream()
        client.close()


def test_short_requests_with_a_busy_cancellation_watcher(tiny_mpt_job: PipelineResult, tmp_path: Path) -> None:
    repo = render_repository(RenderSettings(engine_dir=tiny_mpt_job.engine_dir,
                                            tokenizer_dir=tiny_mpt_job.tokenizer_dir,
                                            output_dir=tmp_path / "triton_repo",
                                            batching=Batching(cancellation_check_period_ms=1)))
    job = dataclasses.replace(tiny_mpt_job, triton_repo=repo)
    server, process = start_test_server(job, tmp_path / "tritonserver.log")
    errors: list[str] = []
    try:
        clients = [threading.Thread(target=_short_requests, args=(server.grpc_url, REQUESTS_PER_CLIENT, errors))
                   for _ in range(CLIENTS)]
        for client in clients:
            client.start()
        for client in clients:
            client.join()
        assert errors == []
        assert process.poll() is None, "tritonserver died"
    finally:
        stop_server(process, shm_prefix=server.shm_prefix)
    assert "Signal (11)" not in (tmp_path / "tritonserver.log").read_text()
