"""Streaming under load: responses merge tokens when they fall behind the engine, never changing the text.

The `tensorrt_llm` model answers executor results on responder threads, one response per request per pass
with every token that arrived since its last one. These tests drive the real tritonserver of the session with
many concurrent gRPC streams and with a client that reads slowly, and check that the joined text and tokens are
exactly those of a non-streaming request, that several tokens per response happen under load, and that every
request ends with exactly one FINAL response.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import numpy as np
import pytest

from generator.serving.client import InferSettings, generate
from tests.conftest import RunningServer

pytestmark = pytest.mark.server

PROMPTS = ["What is machine learning?", "Hello, world! The server", "def generate(model, tokenizer):",
           "The quick brown fox"]
STREAMS = 64
TOKENS = 32


def _input(name: str, value: np.ndarray, dtype: str) -> Any:
    import tritonclient.grpc as grpcclient

    tensor = grpcclient.InferInput(name, list(value.shape), dtype)
    tensor.set_data_from_numpy(value)
    return tensor


def _ensemble_inputs(prompt: str, stream: bool) -> list[Any]:
    return [_input("text_input", np.array([[prompt]], dtype=object), "BYTES"),
            _input("max_tokens", np.array([[TOKENS]], dtype=np.int32), "INT32"),
            _input("min_tokens", np.array([[TOKENS]], dtype=np.int32), "INT32"),
            _input("exclude_input_in_output", np.array([[True]], dtype=bool), "BOOL"),
            _input("stream", np.array([[stream]], dtype=bool), "BOOL")]


def _reference(server: RunningServer, prompt: str) -> tuple[str, list[int]]:
    """Text and token ids of one non-streaming request (one response)."""
    entry = _stream_many(server, [prompt], stream=False)["r0"]
    assert entry["finals"] == 1 and len(entry["ids"]) == 1
    return entry["pieces"][0], entry["ids"][0]


def _stream_many(server: RunningServer, prompts: list[str], read_delay_s: float = 0.0,
                 stream: bool = True) -> dict[str, dict[str, Any]]:
    """Send every prompt as its own request on one gRPC stream at once; gather each one's responses.

    `read_delay_s`: the client sleeps this long per response before taking the next (a slow reader)."""
    import tritonclient.grpc as grpcclient

    events: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: events.put((result, error)))
    state: dict[str, dict[str, Any]] = {}
    try:
        for index, prompt in enumerate(prompts):
            request_id = f"r{index}"
            state[request_id] = {"prompt": prompt, "pieces": [], "ids": [], "finals": 0, "errors": []}
            client.async_stream_infer("ensemble", _ensemble_inputs(prompt, stream), request_id=request_id,
                                      enable_empty_final_response=True)
        open_requests = len(prompts)
        deadline = time.monotonic() + 300
        while open_requests:
            result, error = events.get(timeout=max(1.0, deadline - time.monotonic()))
            if read_delay_s:
                time.sleep(read_delay_s)
            if error is not None:  # a stream error names no request: fail loudly
                raise AssertionError(f"stream error: {error}")
            response = result.get_response()
            entry = state[response.id]
            if response.outputs:
                text = result.as_numpy("text_output")
                ids = result.as_numpy("output_ids")
                length = int(result.as_numpy("sequence_length").reshape(-1)[0])
                entry["pieces"].append(text.reshape(-1)[0].decode("utf-8"))
                entry["ids"].append([int(t) for t in ids.reshape(-1)[:length]])
            if response.parameters["triton_final_response"].bool_param:
                entry["finals"] += 1
                open_requests -= 1
        time.sleep(0.5)  # anything after a FINAL would be a bug: give it the chance to show up
        while not events.empty():
            result, error = events.get()
            assert error is None, error
            state[result.get_response().id]["finals"] += 100  # counted as a violation below
    finally:
        client.stop_stream()
        client.close()
    return state


def test_concurrent_streams_merge_tokens_and_each_ends_with_one_final(triton_server: RunningServer) -> None:
    references = {prompt: _reference(triton_server, prompt) for prompt in PROMPTS}
    prompts = [PROMPTS[index % len(PROMPTS)] for index in range(STREAMS)]
    state = _stream_many(triton_server, prompts)
    responses = tokens = 0
    for request_id, entry in state.items():
        text, ids = references[entry["prompt"]]
        assert entry["finals"] == 1, f"{request_id}: {entry['finals']} FINAL responses"
        assert [t for piece in entry["ids"] for t in piece] == ids, request_id
        assert "".join(entry["pieces"]) == text, request_id
        responses += len(entry["ids"])
        tokens += len(ids)
    assert tokens == STREAMS * TOKENS
    # never more responses than tokens (empty pieces are held back); how many fewer depends on how far the
    # responder falls behind the engine on this machine (tests/test_responder.py forces it)
    assert len(state) <= responses <= tokens


def test_a_slow_reader_gets_the_exact_text(triton_server: RunningServer) -> None:
    prompt = PROMPTS[2]
    text, ids = _reference(triton_server, prompt)
    state = _stream_many(triton_server, [prompt] * 4, read_delay_s=0.02)
    for entry in state.values():
        assert entry["finals"] == 1
        assert [t for piece in entry["ids"] for t in piece] == ids
        assert "".join(entry["pieces"]) == text
    # the same through the CLI's client, which joins what it reads
    streamed = generate(InferSettings(prompt=prompt, url=triton_server.grpc_url, stream=True, max_tokens=TOKENS,
                                      exclude_input_in_output=True, timeout_s=120))
    reference = generate(InferSettings(prompt=prompt, url=triton_server.grpc_url, max_tokens=TOKENS,
                                       exclude_input_in_output=True, timeout_s=120))
    assert streamed.text == reference.text


def test_many_streams_in_threads_all_finish(triton_server: RunningServer) -> None:
    """Several client connections at once (the server's gRPC threads interleave): all finish, none errs."""
    results: list[dict[str, dict[str, Any]]] = []
    errors: list[BaseException] = []

    def worker(offset: int) -> None:
        try:
            results.append(_stream_many(triton_server, [PROMPTS[(offset + i) % len(PROMPTS)] for i in range(16)]))
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(offset,)) for offset in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert all(entry["finals"] == 1 for state in results for entry in state.values())
    assert sum(len(state) for state in results) == 64
