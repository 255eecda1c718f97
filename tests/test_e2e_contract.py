"""Issue 8's contract on a real tritonserver (tiny-mpt, float32): clients shaped exactly like NVIDIA's
`inflight_batcher_llm/client/end_to_end_grpc_client.py`, any subset of declared outputs requested by name, the
TensorRT-LLM 1.x token counts, and the guard that every request ends with a FINAL response or an error.

`anchor_grpc_text` / `anchor_http_text` are reused by tests/test_e2e_layouts.py (TP2) and
tests/test_e2e_variants.py (TP1 DBRX).
"""

from __future__ import annotations

import json
import math
import queue
import threading
import time
import urllib.error
import urllib.request
from functools import partial
from typing import Any

import numpy as np
import pytest

from tests.conftest import RunningServer
from tests.test_e2e import NEW_TOKENS, PROMPTS, _decode, _hf_new_ids, _hf_tokenizer

pytestmark = pytest.mark.server

END_TIMEOUT_S = 60.0  # a request that has not ended by then never will


# --- a client shaped like the anchor's end_to_end_grpc_client.py ------------------------------------------


def anchor_inputs(prompt: str, output_len: int, streaming: bool) -> dict[str, np.ndarray]:
    """The tensors `prepare_inputs` of the anchor client sends with its command-line defaults: the same names,
    shapes ([1, 1]) and dtypes (temperature 1.0, beam_width 1, exclude_input_in_output false)."""
    input0 = [[prompt]]
    return {
        "text_input": np.array(input0).astype(object),
        "max_tokens": np.ones_like(input0).astype(np.int32) * output_len,
        "stream": np.array([[streaming]], dtype=bool),
        "beam_width": np.array([[1]], dtype=np.int32),
        "temperature": np.array([[1.0]], dtype=np.float32),
        "exclude_input_in_output": np.array([[False]], dtype=bool),
    }


def anchor_grpc_text(url: str, model: str, prompt: str, output_len: int, streaming: bool) -> str:
    """What the anchor client prints for one prompt: `start_stream`, `async_stream_infer` with
    `outputs=[InferRequestedOutput("text_output")]`, `stop_stream` (which waits for the server to end the
    request), then the text (streamed pieces appended). Fails if the server never ends the request."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    def callback(user_data: queue.Queue[Any], result: Any, error: Any) -> None:
        user_data.put(error if error else result)

    inputs = []
    for name, value in anchor_inputs(prompt, output_len, streaming).items():
        tensor = grpcclient.InferInput(name, value.shape, np_to_triton_dtype(value.dtype))
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    completed: queue.Queue[Any] = queue.Queue()
    client = grpcclient.InferenceServerClient(url=url)
    client.start_stream(callback=partial(callback, completed))
    client.async_stream_infer(model, inputs, outputs=[grpcclient.InferRequestedOutput("text_output")],
                              request_id="")
    stopper = threading.Thread(target=client.stop_stream, daemon=True)
    stopper.start()
    stopper.join(END_TIMEOUT_S)
    assert not stopper.is_alive(), f"{model}: the server never ended the stream (stream={streaming})"
    client.close()
    text = ""
    while not completed.empty():
        result = completed.get()
        if isinstance(result, Exception):
            raise AssertionError(f"{model}: error from the server: {result}")
        output = result.as_numpy("text_output")
        piece = output.reshape(-1)[0].decode("utf-8")
        text = text + piece if streaming else piece
    return text


def anchor_http_text(url: str, model: str, prompt: str, output_len: int) -> str:
    """The same request through HTTP generate (scalars as JSON values)."""
    body = {name: value.reshape(-1)[0].item() if value.dtype != object else value.reshape(-1)[0]
            for name, value in anchor_inputs(prompt, output_len, False).items()}
    request = urllib.request.Request(f"http://{url}/v2/models/{model}/generate", data=json.dumps(body).encode(),
                                     method="POST")
    with urllib.request.urlopen(request, timeout=END_TIMEOUT_S) as response:
        return str(json.loads(response.read())["text_output"])


def assert_anchor_client_texts(server: RunningServer, model: str, prompt: str, new_text: str,
                               output_len: int) -> None:
    """gRPC non-streaming and HTTP answer `prompt + new_text` (the input is not excluded), gRPC streaming
    answers `new_text`, as the anchor client's `--check-outputs` expects."""
    assert anchor_grpc_text(server.grpc_url, model, prompt, output_len, streaming=False) == prompt + new_text
    assert anchor_grpc_text(server.grpc_url, model, prompt, output_len, streaming=True) == new_text
    assert anchor_http_text(server.http_url, model, prompt, output_len) == prompt + new_text


# --- raw gRPC: every response, and whether the request ended -----------------------------------------------


def grpc_responses(url: str, model: str, values: dict[str, np.ndarray], outputs: list[str] | None = None,
                   cancel_after: int | None = None,
                   request_id: str = "") -> tuple[list[dict[str, np.ndarray]], str | None, bool]:
    """(the outputs of each non-empty response, the error if any, whether the FINAL flag arrived). Empty final
    responses are asked for, so an ended request is always seen as ended."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = grpcclient.InferenceServerClient(url=url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    tensors = []
    for name, value in values.items():
        tensor = grpcclient.InferInput(name, value.shape, np_to_triton_dtype(value.dtype))
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    requested = None if outputs is None else [grpcclient.InferRequestedOutput(name) for name in outputs]
    client.async_stream_infer(model, tensors, outputs=requested, request_id=request_id,
                              enable_empty_final_response=True)
    responses: list[dict[str, np.ndarray]] = []
    error, final = None, False
    deadline = time.monotonic() + END_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            try:
                result, failure = results.get(timeout=0.5)
            except queue.Empty:
                continue
            if failure is not None:
                error, final = str(failure), True
                break
            response = result.get_response()
            named = {tensor.name: result.as_numpy(tensor.name) for tensor in response.outputs}
            if named:
                responses.append(named)
            if cancel_after is not None and len(responses) >= cancel_after:
                break
            if response.parameters["triton_final_response"].bool_param:
                final = True
                break
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()
    return responses, error, final


def ensemble_values(prompt: str, stream: bool, **extra: Any) -> dict[str, np.ndarray]:
    values = {"text_input": np.array([[prompt]], dtype=object), "max_tokens": np.array([[NEW_TOKENS]], np.int32),
              "stream": np.array([[stream]], dtype=bool), "exclude_input_in_output": np.array([[True]], dtype=bool)}
    for name, value in extra.items():
        values[name] = np.array([[value]], dtype=np.asarray(value).dtype if not isinstance(value, float)
                                else np.float32)
    return values


def core_values(server: RunningServer, prompt: str, stream: bool, **extra: Any) -> dict[str, np.ndarray]:
    ids = _hf_tokenizer(server.job.hf_dir).encode(prompt)
    values = {"input_ids": np.array([ids], dtype=np.int32), "input_lengths": np.array([[len(ids)]], np.int32),
              "request_output_len": np.array([[NEW_TOKENS]], np.int32), "streaming": np.array([[stream]], bool),
              "exclude_input_in_output": np.array([[True]], dtype=bool)}
    for name, value in extra.items():
        values[name] = np.array([[value]], dtype=bool if isinstance(value, bool) else np.int32)
    return values


def joined_text(responses: list[dict[str, np.ndarray]]) -> str:
    return "".join(r["text_output"].reshape(-1)[0].decode() for r in responses if "text_output" in r)


# --- 1. a client naming its outputs gets them (it got nothing before) ---------------------------------------


@pytest.mark.parametrize("model", ["ensemble", "tensorrt_llm_bls"])
def test_anchor_client_gets_transformers_greedy_text(triton_server: RunningServer, model: str) -> None:
    job, prompt = triton_server.job, PROMPTS[0]
    assert_anchor_client_texts(triton_server, model, prompt, _decode(job, _hf_new_ids(job.hf_dir, prompt)),
                               NEW_TOKENS)


#: outputs that are the same for the same greedy request (not the timings)
DETERMINISTIC = {"text_output", "output_ids", "sequence_length", "batch_index", "num_input_tokens",
                 "num_output_tokens"}
SUBSETS = {
    "ensemble": [["text_output"], ["cum_log_probs"], ["text_output", "batch_index"], ["output_ids"],
                 ["text_output", "sequence_length", "num_output_tokens"]],
    "tensorrt_llm_bls": [["text_output"], ["cum_log_probs"], ["text_output", "batch_index", "num_input_tokens"]],
    "tensorrt_llm": [["output_ids"], ["sequence_length"], ["cum_log_probs", "num_output_tokens"]],
}


def _assert_same_stream(responses: list[dict], everything: list[dict], names: set[str]) -> None:
    """Two streams of one greedy request carry the same tokens, whichever responses they came in."""
    for name in names:
        ours = [r[name] for r in responses if name in r]
        theirs = [r[name] for r in everything if name in r]
        if name == "output_ids":
            np.testing.assert_array_equal(np.concatenate([a.reshape(-1) for a in ours]),
                                          np.concatenate([a.reshape(-1) for a in theirs]), err_msg=name)
        elif name in ("sequence_length", "num_output_tokens"):  # per response: they add up to the total
            assert sum(int(a.sum()) for a in ours) == sum(int(a.sum()) for a in theirs), name
        elif name != "text_output":  # the same value on every response (batch_index, num_input_tokens)
            assert {a.reshape(-1).tolist()[0] for a in ours} == {a.reshape(-1).tolist()[0] for a in theirs}, name


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("model", list(SUBSETS))
def test_any_subset_of_outputs_requested_by_name_answers(triton_server: RunningServer, model: str,
                                                         stream: bool) -> None:
    prompt = PROMPTS[1]
    counts = {"return_num_input_tokens": True, "return_num_output_tokens": True}
    values = (core_values(triton_server, prompt, stream, **counts) if model == "tensorrt_llm"
              else ensemble_values(prompt, stream, **counts))
    everything, error, final = grpc_responses(triton_server.grpc_url, model, values)
    assert error is None and final and everything
    for subset in SUBSETS[model]:
        responses, error, final = grpc_responses(triton_server.grpc_url, model, values, outputs=subset)
        assert error is None and final, (subset, error)
        assert all(set(got) == set(subset) for got in responses), subset
        if stream:  # how a stream splits into responses depends on timing: compare what the responses add up to
            _assert_same_stream(responses, everything, set(subset) & DETERMINISTIC)
        else:
            assert len(responses) == len(everything), subset
            for got, full in zip(responses, everything, strict=True):
                for name in set(subset) & DETERMINISTIC:
                    np.testing.assert_array_equal(got[name], full[name], err_msg=f"{subset} {name}")
        if "text_output" in subset:
            assert joined_text(responses) == joined_text(everything)


# --- 2. TensorRT-LLM 1.x token counts ----------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("model", ["ensemble", "tensorrt_llm_bls"])
def test_num_input_and_output_tokens_are_returned(triton_server: RunningServer, model: str, stream: bool) -> None:
    """As Triton's OpenAI frontend asks: num_input_tokens is the prompt's length on every response,
    num_output_tokens the tokens each response carries (their sum is the total generated)."""
    job, prompt = triton_server.job, PROMPTS[2]
    prompt_len = len(_hf_tokenizer(job.hf_dir).encode(prompt))
    generated = len(_hf_new_ids(job.hf_dir, prompt))
    values = ensemble_values(prompt, stream, return_num_input_tokens=True, return_num_output_tokens=True)
    responses, error, final = grpc_responses(triton_server.grpc_url, model, values)
    assert error is None and final and responses
    assert all(int(r["num_input_tokens"].reshape(-1)[0]) == prompt_len for r in responses)
    assert sum(int(r["num_output_tokens"].reshape(-1)[0]) for r in responses) == generated
    if not stream:
        assert len(responses) == 1
    # without the flags the counts are not returned (a c2e65b8 client sees what it saw before)
    plain, _, _ = grpc_responses(triton_server.grpc_url, model, ensemble_values(prompt, stream))
    assert all("num_input_tokens" not in r and "num_output_tokens" not in r for r in plain)
    assert joined_text(plain) == joined_text(responses)
    if not stream:  # HTTP generate, as the OpenAI frontend's non-streaming requests
        body = {"text_input": prompt, "max_tokens": NEW_TOKENS, "exclude_input_in_output": True,
                "return_num_input_tokens": True, "return_num_output_tokens": True}
        request = urllib.request.Request(f"http://{triton_server.http_url}/v2/models/{model}/generate",
                                         data=json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(request, timeout=END_TIMEOUT_S) as response:
            answer = json.loads(response.read())
        assert (answer["num_input_tokens"], answer["num_output_tokens"]) == (prompt_len, generated)


# --- 3. every request ends: bad values, odd subsets, cancellation ---------------------------------------------


BAD_VALUES = [
    ({"temperature": math.nan}, "temperature"), ({"temperature": math.inf}, "temperature"),
    ({"temperature": -1.0}, "temperature"), ({"top_p": math.nan}, "top_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"), ({"repetition_penalty": math.nan}, "repetition_penalty"),
    ({"presence_penalty": math.inf}, "presence_penalty"), ({"frequency_penalty": math.nan}, "frequency_penalty"),
    ({"min_tokens": np.int32(-1)}, "min_tokens"), ({"beam_width": np.int32(0)}, "beam_width must be at least 1"),
]


@pytest.mark.parametrize("model", ["ensemble", "tensorrt_llm_bls"])
@pytest.mark.parametrize(("extra", "message"), BAD_VALUES, ids=[str(e) for e, _ in BAD_VALUES])
def test_bad_sampling_values_end_with_a_clear_error(triton_server: RunningServer, model: str,
                                                    extra: dict[str, Any], message: str) -> None:
    responses, error, final = grpc_responses(triton_server.grpc_url, model,
                                             ensemble_values(PROMPTS[0], True, **extra), outputs=["text_output"])
    assert final and error is not None and message in error, error
    assert not responses


@pytest.mark.parametrize("length", [-1, 0, 99])
def test_bad_input_lengths_end_with_a_clear_error(triton_server: RunningServer, length: int) -> None:
    values = core_values(triton_server, PROMPTS[0], True)
    values["input_lengths"] = np.array([[length]], np.int32)
    _, error, final = grpc_responses(triton_server.grpc_url, "tensorrt_llm", values)
    assert final and error is not None and "input_lengths" in error, error


@pytest.mark.parametrize("model", ["ensemble", "tensorrt_llm_bls"])
def test_cancelled_streams_end_and_the_server_keeps_serving(triton_server: RunningServer, model: str) -> None:
    """Streams cancelled after their first piece, with and without requested outputs: each ends on the
    server (the next requests are answered at once, and the stubs hold no request)."""
    values = ensemble_values(PROMPTS[0], True)
    values["max_tokens"] = np.array([[40]], np.int32)
    for outputs in (None, ["text_output"], ["text_output", "cum_log_probs"]):
        for _ in range(3):
            responses, _, _ = grpc_responses(triton_server.grpc_url, model, values, outputs=outputs,
                                             cancel_after=1)
            assert responses
    job, prompt = triton_server.job, PROMPTS[0]
    expected = _decode(job, _hf_new_ids(job.hf_dir, prompt))
    started = time.monotonic()
    responses, error, final = grpc_responses(triton_server.grpc_url, model, ensemble_values(prompt, False),
                                             outputs=["text_output"])
    assert error is None and final and joined_text(responses) == expected
    assert time.monotonic() - started < 30


def test_stop_request_ends_the_request_it_names(triton_server: RunningServer) -> None:
    """TensorRT-LLM's `stop` input: a request with stop=true and another request's id ends that request early
    (what the BLS sends when its client cancels), and is itself answered with an empty FINAL response."""
    import tritonclient.grpc as grpcclient

    values = core_values(triton_server, PROMPTS[0], True)
    values["request_output_len"] = np.array([[60]], np.int32)
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = grpcclient.InferenceServerClient(url=triton_server.grpc_url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    tensors = []
    for name, value in values.items():
        tensor = grpcclient.InferInput(name, list(value.shape), "BOOL" if value.dtype == bool else "INT32")
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    client.async_stream_infer("tensorrt_llm", tensors, request_id="to-stop", enable_empty_final_response=True)
    try:
        first, error = results.get(timeout=END_TIMEOUT_S)
        assert error is None
        stop = core_values(triton_server, PROMPTS[0], True)
        stop["stop"] = np.array([[True]], dtype=bool)
        _, stop_error, stop_final = grpc_responses(triton_server.grpc_url, "tensorrt_llm", stop,
                                                         request_id="to-stop")
        assert stop_error is None and stop_final
        tokens = 1
        while True:
            result, error = results.get(timeout=END_TIMEOUT_S)
            assert error is None
            output = result.as_numpy("output_ids")
            tokens += 0 if output is None else output.size
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
        assert tokens < 60
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()


# --- 4. exclude_input_in_output false: as TensorRT-LLM, the prompt comes back only in a whole answer -----------
# TensorRT-LLM's executor (LlmRequest::createResult) returns prompt + new tokens only when not streaming; a
# streamed result always holds just the tokens since the last one, whatever excludeInputFromOutput says, and the
# inflight_batcher_llm ensemble / BLS decode what tensorrt_llm sends.


@pytest.mark.parametrize("model", ["tensorrt_llm", "ensemble", "tensorrt_llm_bls"])
def test_included_input_comes_back_whole_and_never_streamed(triton_server: RunningServer, model: str) -> None:
    job, prompt = triton_server.job, PROMPTS[1]
    prompt_ids = _hf_tokenizer(job.hf_dir).encode(prompt)
    new_ids = list(_hf_new_ids(job.hf_dir, prompt))
    answers = {}
    for stream in (False, True):
        values = (core_values(triton_server, prompt, stream) if model == "tensorrt_llm"
                  else ensemble_values(prompt, stream))
        values["exclude_input_in_output"] = np.array([[False]], dtype=bool)
        responses, error, final = grpc_responses(triton_server.grpc_url, model, values)
        assert error is None and final and responses, (stream, error)
        if model == "tensorrt_llm":
            answers[stream] = [int(t) for r in responses for t in r["output_ids"].reshape(-1)]
            lengths = sum(int(r["sequence_length"].sum()) for r in responses)
            assert lengths == len(answers[stream]), stream
        else:
            answers[stream] = joined_text(responses)
    if model == "tensorrt_llm":
        assert answers[False] == prompt_ids + new_ids
        assert answers[True] == new_ids
    else:
        assert answers[False] == prompt + _decode(job, new_ids)
        assert answers[True] == _decode(job, new_ids)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("model", ["ensemble", "tensorrt_llm_bls"])
def test_infer_include_input_streams_the_prompt_first(triton_server: RunningServer, model: str,
                                                      protocol: str) -> None:
    """`gen-repo infer --stream --include-input-in-output` (issue 10 item 9): the prompt is the first piece and
    the pieces join exactly to the non-streamed answer, which repeats the prompt."""
    from generator.serving.client import InferSettings, generate

    prompt = PROMPTS[2]
    url = triton_server.grpc_url if protocol == "grpc" else triton_server.http_url
    settings = InferSettings(prompt=prompt, url=url, protocol=protocol, model=model, max_tokens=NEW_TOKENS,
                             exclude_input_in_output=False, timeout_s=120)
    seen: list[str] = []
    streamed = generate(InferSettings(**{**settings.__dict__, "stream": True}), on_piece=seen.append)
    whole = generate(settings)
    assert seen == streamed.pieces and streamed.pieces[0] == prompt and len(streamed.pieces) > 2
    assert whole.text.startswith(prompt) and len(whole.text) > len(prompt)
    assert streamed.text == whole.text
