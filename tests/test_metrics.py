"""LLM metrics on tritonserver's /metrics after known requests, and cancellation through the OpenAI front.

The server here serves a tiny-mpt engine built with max_seq_len 2048, so that a long request is still running
when its client goes away.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator

import httpx
import pytest

from generator.pipeline import PipelineResult
from generator.serving.client import build_grpc_inputs, model_inputs, stream_grpc
from generator.serving.openai_server import BackgroundFront, OpenAISettings
from generator.serving.serve import free_port, stop_server
from tests.conftest import RunningServer, run_tiny_job, start_test_server

pytestmark = pytest.mark.server
MODEL = 'model="tensorrt_llm"'


@pytest.fixture(scope="module")
def long_server(tiny_mpt_job: PipelineResult, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """tiny-mpt with 4096 positions (ALiBi: only the config changes), built with max_seq_len 4096."""
    hf_dir = tmp_path_factory.mktemp("tiny-mpt-long") / "hf"
    shutil.copytree(tiny_mpt_job.hf_dir, hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    config["max_seq_len"] = 4096
    (hf_dir / "config.json").write_text(json.dumps(config))
    job = run_tiny_job(str(hf_dir), hf_dir.parent / "job", max_seq_len=4096, max_input_len=64)
    server, process = start_test_server(job, tmp_path_factory.mktemp("long-server") / "tritonserver.log")
    try:
        yield server
    finally:
        stop_server(process, shm_prefix=server.shm_prefix)


def scrape(server: RunningServer) -> dict[str, float]:
    """`{'name{labels}': value}` of the gen_repo_ metrics."""
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        match = re.match(r"^(gen_repo_\w+(?:\{[^}]*\})?)\s+(\S+)$", line)
        if match:
            values[match.group(1)] = float(match.group(2))
    return values


def metric(values: dict[str, float], name: str, *labels: str) -> float:
    """The value of `name` whose labels include all of `labels` (0 when absent)."""
    for key, value in values.items():
        if key.split("{")[0] == name and all(label in key for label in labels):
            return value
    return 0.0


def _ids_request(server: RunningServer, prompt: list[int], tokens: int, stream: bool) -> int:
    values = {"input_ids": prompt, "input_lengths": len(prompt), "request_output_len": tokens,
              "min_tokens": tokens, "streaming": stream, "exclude_input_in_output": True}
    inputs = build_grpc_inputs(values, model_inputs(server.grpc_url, "tensorrt_llm"), "tensorrt_llm")
    count = 0
    for result in stream_grpc(server.grpc_url, "tensorrt_llm", inputs, timeout_s=120):
        ids = result.as_numpy("output_ids")
        count += 0 if ids is None else int(ids.size)
    return count


def _wait_for(server: RunningServer, check: object, timeout_s: float = 5.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    values = scrape(server)
    while time.monotonic() < deadline and not check(values):  # type: ignore[operator]
        time.sleep(0.1)
        values = scrape(server)
    return values


def test_metrics_count_known_requests(long_server: RunningServer) -> None:
    before = scrape(long_server)
    assert metric(before, "gen_repo_num_requests_running", MODEL) == 0
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14]]
    assert _ids_request(long_server, prompts[0], 6, stream=True) == 6
    assert _ids_request(long_server, prompts[1], 4, stream=True) == 4
    assert _ids_request(long_server, prompts[2], 5, stream=False) == 5

    def finished(values: dict[str, float]) -> bool:
        return (metric(values, "gen_repo_requests_finished_total", MODEL, 'reason="length"')
                - metric(before, "gen_repo_requests_finished_total", MODEL, 'reason="length"')) >= 3

    after = _wait_for(long_server, finished)

    def delta(name: str, *labels: str) -> float:
        return metric(after, name, MODEL, *labels) - metric(before, name, MODEL, *labels)

    assert delta("gen_repo_requests_finished_total", 'reason="length"') == 3
    assert delta("gen_repo_generation_tokens_total") == 15
    assert delta("gen_repo_prompt_tokens_total") == 10
    assert delta("gen_repo_e2e_request_latency_seconds_count") == 3
    assert delta("gen_repo_request_queue_time_seconds_count") == 3
    assert delta("gen_repo_time_to_first_token_seconds_count") == 2  # streaming requests only
    assert delta("gen_repo_inter_token_latency_seconds_count") == 2
    assert delta("gen_repo_e2e_request_latency_seconds_sum") > 0
    assert delta("gen_repo_time_to_first_token_seconds_bucket", 'le="+Inf"') == 2
    assert metric(after, "gen_repo_num_requests_waiting", MODEL) == 0
    assert metric(after, "gen_repo_kv_cache_usage_ratio", MODEL) == 0


def test_openai_client_disconnect_cancels_the_request_in_the_engine(long_server: RunningServer) -> None:
    port = free_port()
    front = BackgroundFront(OpenAISettings(triton_url=long_server.grpc_url, port=port))
    front.start()
    try:
        before = scrape(long_server)
        body = {"model": "ensemble", "prompt": "Hello", "max_tokens": 4000, "min_tokens": 4000, "temperature": 0,
                "stream": True}
        events = 0
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                events += line.startswith("data:")
                if events == 3:
                    break  # leaving the block closes the connection mid-stream
        running = _wait_for(long_server, lambda v: metric(v, "gen_repo_num_requests_running", MODEL) >= 0, 0)
        gone_at = time.monotonic()

        def cancelled(values: dict[str, float]) -> bool:
            return (metric(values, "gen_repo_requests_finished_total", MODEL, 'reason="cancelled"')
                    > metric(before, "gen_repo_requests_finished_total", MODEL, 'reason="cancelled"'))

        after = _wait_for(long_server, cancelled, timeout_s=5.0)
        assert cancelled(after), f"not cancelled in the engine: {running}"
        assert time.monotonic() - gone_at < 3.0  # cancellation period 100 ms + metrics export period 500 ms
        generated = (metric(after, "gen_repo_generation_tokens_total", MODEL)
                     - metric(before, "gen_repo_generation_tokens_total", MODEL))
        assert 3 <= generated < 4000
        assert metric(after, "gen_repo_num_requests_running", MODEL) == 0
    finally:
        front.stop()


def test_serve_openai_port_starts_and_stops_with_the_server(long_server: RunningServer, tmp_path: object) -> None:
    """`gen-repo serve --openai-port` answers on the port and SIGTERM stops both (same lifecycle)."""
    import signal
    import sys
    from pathlib import Path

    ports = [free_port() for _ in range(4)]
    log = Path(str(tmp_path)) / "serve.log"
    command = [sys.executable, "-m", "generator", "serve", "--model-repository", str(long_server.job.triton_repo),
               "--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]),
               "--openai-port", str(ports[3]), "--log-file", str(Path(str(tmp_path)) / "triton.log")]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while "OpenAI-compatible API" not in log.read_text() and time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()
            time.sleep(0.5)
        answer = httpx.post(f"http://127.0.0.1:{ports[3]}/v1/completions", timeout=60,
                            json={"model": "ensemble", "prompt": "Hi", "max_tokens": 3, "min_tokens": 3})
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 3
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log.read_text()
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{ports[3]}/health", timeout=5)
    finally:
        if process.poll() is None:
            stop_server(process)  # type: ignore[arg-type]
