"""End to end: tiny-mpt through convert -> build -> render -> a real tritonserver, compared with transformers.

Greedy decoding through Triton must give exactly the tokens (and so the text) of transformers'
`generate(do_sample=False)` on the same float32 HF checkpoint.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from generator.errors import GenRepoError
from generator.pipeline import PipelineResult
from generator.serving.client import InferSettings, build_grpc_inputs, generate, model_inputs, stream_grpc
from tests.conftest import RunningServer
from tests.factories import hf_greedy

PROMPTS = ["What is machine learning?", "Hello, world! The server", "def generate(model, tokenizer):"]
NEW_TOKENS = 12

pytestmark = pytest.mark.server


@cache
def _hf_tokenizer(hf_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_dir)


@cache
def _hf_new_ids(hf_dir: Path, prompt: str, new_tokens: int = NEW_TOKENS) -> tuple[int, ...]:
    """transformers' greedy continuation of `prompt` (new token ids only), float32."""
    ids = _hf_tokenizer(hf_dir).encode(prompt)
    return tuple(hf_greedy(hf_dir, [ids], new_tokens)[0])


def _decode(job: PipelineResult, ids: tuple[int, ...] | list[int]) -> str:
    return str(_hf_tokenizer(job.hf_dir).decode(list(ids), skip_special_tokens=True))


def _ask(server: RunningServer, prompt: str, protocol: str = "grpc", **fields: Any) -> str:
    url = server.grpc_url if protocol == "grpc" else server.http_url
    settings = InferSettings(prompt=prompt, url=url, protocol=protocol, max_tokens=fields.pop("max_tokens", NEW_TOKENS),
                             exclude_input_in_output=fields.pop("exclude_input_in_output", True), timeout_s=120,
                             **fields)
    return generate(settings).text


def _core_model_ids(server: RunningServer, input_ids: list[int], max_new_tokens: int, **extra: Any) -> list[int]:
    """Token ids straight from the `tensorrt_llm` model (no tokenizer in the way)."""
    values = {"input_ids": input_ids, "input_lengths": len(input_ids), "request_output_len": max_new_tokens,
              "exclude_input_in_output": True, **extra}
    inputs = build_grpc_inputs(values, model_inputs(server.grpc_url, "tensorrt_llm"), "tensorrt_llm")
    ids: list[int] = []
    for result in stream_grpc(server.grpc_url, "tensorrt_llm", inputs, timeout_s=120):
        output = result.as_numpy("output_ids")
        if output is None:
            continue
        lengths = result.as_numpy("sequence_length")
        row = np.asarray(output).reshape(-1)
        length = int(np.asarray(lengths).reshape(-1)[0]) if lengths is not None else row.size
        ids.extend(int(t) for t in row[:length])
    return ids


# --- parity -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", PROMPTS)
def test_core_model_token_ids_equal_transformers_greedy(triton_server: RunningServer, prompt: str) -> None:
    job = triton_server.job
    prompt_ids = _hf_tokenizer(job.hf_dir).encode(prompt)
    served = _core_model_ids(triton_server, prompt_ids, NEW_TOKENS)
    assert served == list(_hf_new_ids(job.hf_dir, prompt))


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_ensemble_text_equals_transformers_greedy(triton_server: RunningServer, prompt: str, protocol: str) -> None:
    job = triton_server.job
    hf_ids = _hf_new_ids(job.hf_dir, prompt)
    text = _ask(triton_server, prompt, protocol)
    assert text == _decode(job, hf_ids)
    assert len(text) > 0
    # the text re-tokenizes to the same ids (the tiny tokenizer round-trips generated text)
    assert _hf_tokenizer(job.hf_dir).encode(text) == list(hf_ids)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_ensemble_token_ids_equal_transformers_greedy(triton_server: RunningServer, protocol: str) -> None:
    """The ensemble also returns the generated ids (`output_ids`): exactly transformers' greedy ids."""
    job = triton_server.job
    for prompt in PROMPTS:
        values = {"text_input": prompt, "max_tokens": NEW_TOKENS, "exclude_input_in_output": True}
        if protocol == "http":
            request = urllib.request.Request(f"http://{triton_server.http_url}/v2/models/ensemble/generate",
                                             data=json.dumps(values).encode(), method="POST")
            with urllib.request.urlopen(request, timeout=120) as response:
                body = json.loads(response.read())
            served = np.asarray(body["output_ids"]).reshape(-1)[: int(np.asarray(body["sequence_length"]).reshape(-1)[0])]
        else:
            inputs = build_grpc_inputs(values, model_inputs(triton_server.grpc_url, "ensemble"), "ensemble")
            results = [r for r in stream_grpc(triton_server.grpc_url, "ensemble", inputs, timeout_s=120)
                       if r.as_numpy("output_ids") is not None]
            assert len(results) == 1
            length = int(results[0].as_numpy("sequence_length").reshape(-1)[0])
            served = results[0].as_numpy("output_ids").reshape(-1)[:length]
        assert served.tolist() == list(_hf_new_ids(job.hf_dir, prompt)), (prompt, protocol)


def test_ensemble_includes_the_prompt_unless_excluded(triton_server: RunningServer) -> None:
    prompt = PROMPTS[0]
    with_prompt = _ask(triton_server, prompt, exclude_input_in_output=False)
    without = _ask(triton_server, prompt, exclude_input_in_output=True)
    assert with_prompt == prompt + without


def test_bls_model_gives_the_same_text(triton_server: RunningServer) -> None:
    prompt = PROMPTS[1]
    text = _ask(triton_server, prompt, model="tensorrt_llm_bls")
    assert text == _decode(triton_server.job, _hf_new_ids(triton_server.job.hf_dir, prompt))


# --- streaming --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_streamed_pieces_join_to_the_non_streaming_text(triton_server: RunningServer, protocol: str) -> None:
    prompt = PROMPTS[2]
    url = triton_server.grpc_url if protocol == "grpc" else triton_server.http_url
    seen: list[str] = []
    streamed = generate(InferSettings(prompt=prompt, url=url, protocol=protocol, stream=True, max_tokens=NEW_TOKENS,
                                      exclude_input_in_output=True, timeout_s=120), on_piece=seen.append)
    assert seen == streamed.pieces
    assert len(streamed.pieces) >= NEW_TOKENS // 2  # one piece per token, give or take empty pieces
    assert streamed.text == _ask(triton_server, prompt, protocol)


# --- generation controls ----------------------------------------------------------------------------------


def test_max_tokens_is_honoured(triton_server: RunningServer) -> None:
    job, prompt = triton_server.job, PROMPTS[0]
    hf_ids = _hf_new_ids(job.hf_dir, prompt)
    assert _ask(triton_server, prompt, max_tokens=3) == _decode(job, hf_ids[:3])
    prompt_ids = _hf_tokenizer(job.hf_dir).encode(prompt)
    assert _core_model_ids(triton_server, prompt_ids, 5) == list(hf_ids[:5])


def test_end_id_stops_before_that_token(triton_server: RunningServer) -> None:
    job, prompt = triton_server.job, PROMPTS[1]
    hf_ids = list(_hf_new_ids(job.hf_dir, prompt))
    # the first token whose first occurrence is not at position 0, so some text comes before it
    position = next(i for i in range(1, len(hf_ids)) if hf_ids.index(hf_ids[i]) == i)
    assert _ask(triton_server, prompt, end_id=hf_ids[position]) == _decode(job, hf_ids[:position])
    prompt_ids = _hf_tokenizer(job.hf_dir).encode(prompt)
    assert _core_model_ids(triton_server, prompt_ids, NEW_TOKENS, end_id=hf_ids[position]) == hf_ids[:position]


def test_end_id_as_the_first_token_gives_empty_text(triton_server: RunningServer) -> None:
    job, prompt = triton_server.job, PROMPTS[1]
    hf_ids = list(_hf_new_ids(job.hf_dir, prompt))
    assert _ask(triton_server, prompt, end_id=hf_ids[0]) == ""


def test_stop_word_ends_generation(triton_server: RunningServer) -> None:
    job, prompt = triton_server.job, PROMPTS[0]
    tokenizer = _hf_tokenizer(job.hf_dir)
    hf_ids = list(_hf_new_ids(job.hf_dir, prompt))
    # a token from the middle whose text encodes back to exactly that token, first occurrence
    position = next(i for i in range(2, len(hf_ids) - 2)
                    if tokenizer.encode(_decode(job, [hf_ids[i]])) == [hf_ids[i]] and hf_ids.index(hf_ids[i]) == i)
    stop_word = _decode(job, [hf_ids[position]])
    text = _ask(triton_server, prompt, stop_words=(stop_word,))
    # TensorRT-LLM keeps the stop word in the output
    assert text == _decode(job, hf_ids[:position + 1])
    assert len(text) < len(_decode(job, hf_ids))


def test_sampling_with_a_seed_is_reproducible(triton_server: RunningServer) -> None:
    first = _ask(triton_server, PROMPTS[0], temperature=1.0, top_k=20, seed=7)
    second = _ask(triton_server, PROMPTS[0], temperature=1.0, top_k=20, seed=7)
    assert first == second and first


# --- bad input: a clear error, and the server keeps serving -----------------------------------------------


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize(("prompt", "fields", "message"), [
    ("", {}, "empty"),
    (PROMPTS[0], {"max_tokens": 0}, "max_tokens"),
    (PROMPTS[0], {"max_tokens": -3}, "max_tokens"),
    ("word " * 200, {}, "max_input_len"),
])
def test_bad_request_gets_a_clear_error(triton_server: RunningServer, protocol: str, prompt: str,
                                        fields: dict[str, Any], message: str) -> None:
    with pytest.raises(GenRepoError, match=message):
        _ask(triton_server, prompt, protocol, **fields)
    assert _ask(triton_server, PROMPTS[0], protocol) == _decode(triton_server.job,
                                                              _hf_new_ids(triton_server.job.hf_dir, PROMPTS[0]))


def test_batch_over_max_batch_size_is_refused(triton_server: RunningServer) -> None:
    import tritonclient.grpc as grpcclient

    max_batch_size = json.loads((triton_server.job.engine_dir / "config.json").read_text())["build_config"][
        "max_batch_size"]
    batch = max_batch_size + 1
    text = grpcclient.InferInput("text_input", [batch, 1], "BYTES")
    text.set_data_from_numpy(np.array([[b"hello"]] * batch, dtype=np.object_))
    max_tokens = grpcclient.InferInput("max_tokens", [batch, 1], "INT32")
    max_tokens.set_data_from_numpy(np.full((batch, 1), 4, dtype=np.int32))
    with pytest.raises(GenRepoError, match="batch"):
        list(stream_grpc(triton_server.grpc_url, "ensemble", [text, max_tokens], timeout_s=60))
    assert _ask(triton_server, PROMPTS[2]) == _decode(triton_server.job,
                                                     _hf_new_ids(triton_server.job.hf_dir, PROMPTS[2]))


def test_health_and_metrics_endpoints(triton_server: RunningServer) -> None:
    with urllib.request.urlopen(f"http://{triton_server.http_url}/v2/health/ready", timeout=5) as response:
        assert response.status == 200
    with urllib.request.urlopen(triton_server.metrics_url, timeout=5) as response:
        metrics = response.read().decode()
    assert 'nv_inference_request_success{model="ensemble"' in metrics
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(f"http://{triton_server.http_url}/v2/models/no_such_model/ready", timeout=5)
