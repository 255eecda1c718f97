"""The OpenAI-compatible front against a real tritonserver, driven with the official `openai` client.

Greedy text must equal transformers' greedy `generate` on the same checkpoint (completions and chat, streamed
and not), usage must equal the tokenizer's counts, and what cannot be honoured must be an OpenAI-shaped 400.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import pytest

from generator.serving.openai_server import (
    ApiError,
    BackgroundFront,
    OpenAISettings,
    StopText,
    find_chat_template,
    json_depth,
    parse_body,
    parse_common,
)
from generator.serving.serve import free_port
from tests.conftest import RunningServer
from tests.factories import hf_greedy

NEW_TOKENS = 10
PROMPT = "What is machine learning?"
# a small ChatML-like template (tiny-mpt's tokenizer ships none)
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@cache
def _hf_tokenizer(hf_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_dir)


@cache
def _hf_text(hf_dir: Path, prompt: str, new_tokens: int = NEW_TOKENS) -> str:
    """transformers' greedy continuation of `prompt` as text (special tokens skipped, as postprocessing does)."""
    tokenizer = _hf_tokenizer(hf_dir)
    ids = hf_greedy(hf_dir, [tokenizer.encode(prompt)], new_tokens)[0]
    return str(tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))


def _start_front(settings: OpenAISettings) -> BackgroundFront:
    front = BackgroundFront(settings)
    front.start()
    return front


@pytest.fixture(scope="module")
def template_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("chat") / "template.jinja"
    path.write_text(TEMPLATE)
    return path


@pytest.fixture(scope="module")
def front_url(triton_server: RunningServer, template_file: Path) -> Iterator[str]:
    """The front with --chat-template, on the session's tritonserver; its tokenizer found through Triton."""
    port = free_port()
    front = _start_front(OpenAISettings(triton_url=triton_server.grpc_url, chat_template=template_file, port=port,
                                        max_body_bytes=64 << 10, max_json_depth=32))
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        front.stop()


@pytest.fixture(scope="module")
def plain_front_url(triton_server: RunningServer) -> Iterator[str]:
    """The front with the tokenizer dir only (tiny-mpt's tokenizer has no chat template)."""
    port = free_port()
    front = _start_front(OpenAISettings(triton_url=triton_server.grpc_url,
                                        tokenizer_dir=triton_server.job.tokenizer_dir, port=port))
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        front.stop()


def _client(url: str) -> Any:
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


GREEDY = {"temperature": 0, "max_tokens": NEW_TOKENS, "extra_body": {"min_tokens": NEW_TOKENS}}

pytestmark = pytest.mark.server


# --- no server needed -----------------------------------------------------------------------------------


def test_stop_text_holds_back_a_possible_stop_and_cuts_at_it() -> None:
    stop = StopText(["END", "\n\n"])
    assert stop.push("abc E") == "abc "
    assert stop.push("N") == ""
    assert stop.push("Dxyz") == ""
    assert stop.stopped
    other = StopText(["END"])
    assert other.push("aE") == "a" and other.push("x") == "Ex" and other.flush() == ""


def test_parse_body_rejects_deep_and_non_object_json() -> None:
    assert json_depth({"a": [1, {"b": []}]}) == 4
    with pytest.raises(ApiError, match="nested"):
        parse_body(b"[" * 100_000 + b"]" * 100_000, 64)
    with pytest.raises(ApiError, match="nested"):
        parse_body(json.dumps({"a": [[[[[[1]]]]]]}).encode(), 4)
    with pytest.raises(ApiError, match="JSON object"):
        parse_body(b"[1]", 64)


@pytest.mark.parametrize(("field", "value"), [("n", 2), ("tools", [{"type": "function"}]), ("best_of", 3),
                                               ("logit_bias", {"1": 5}), ("temperature", 3.0), ("top_p", 0),
                                               ("max_tokens", 0), ("seed", -1), ("stop", [1]),
                                               ("response_format", {"type": "json_object"}), ("logprobs", 5)])
def test_parse_rejects_what_cannot_be_honoured(field: str, value: Any) -> None:
    with pytest.raises(ApiError) as caught:
        parse_common({"model": "ensemble", field: value}, chat=False, prompt="x")
    assert caught.value.status == 400 and caught.value.param == field


def test_chat_template_from_tokenizer_config(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    assert find_chat_template(tmp_path, None) == TEMPLATE
    override = tmp_path / "t.jinja"
    override.write_text("x")
    assert find_chat_template(tmp_path, override) == "x"
    assert find_chat_template(tmp_path / "missing", None) is None


# --- against tritonserver -------------------------------------------------------------------------------


def test_models_lists_the_ensemble_and_bls(front_url: str) -> None:
    ids = [model.id for model in _client(front_url).models.list()]
    assert "ensemble" in ids and "tensorrt_llm_bls" in ids


@pytest.mark.parametrize("model", ["ensemble", "tensorrt_llm_bls"])
def test_completion_greedy_equals_transformers_with_usage(front_url: str, triton_server: RunningServer,
                                                          model: str) -> None:
    hf_dir = triton_server.job.hf_dir
    answer = _client(front_url).completions.create(model=model, prompt=PROMPT, **GREEDY)
    assert answer.choices[0].text == _hf_text(hf_dir, PROMPT)
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.prompt_tokens == len(_hf_tokenizer(hf_dir).encode(PROMPT))
    assert answer.usage.completion_tokens == NEW_TOKENS
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + NEW_TOKENS


def test_completion_stream_joins_to_transformers_text_and_reports_usage(front_url: str,
                                                                       triton_server: RunningServer) -> None:
    hf_dir = triton_server.job.hf_dir
    chunks = list(_client(front_url).completions.create(model="ensemble", prompt=PROMPT, stream=True,
                                                        stream_options={"include_usage": True}, **GREEDY))
    text = "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)
    assert text == _hf_text(hf_dir, PROMPT)
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 1  # really streamed
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == len(_hf_tokenizer(hf_dir).encode(PROMPT))
    assert chunks[-1].usage.completion_tokens == NEW_TOKENS


def _chat_prompt(messages: list[dict[str, str]]) -> str:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return environment.from_string(TEMPLATE).render(messages=messages, add_generation_prompt=True)


@pytest.mark.parametrize("stream", [False, True])
def test_chat_greedy_equals_transformers_on_the_templated_prompt(front_url: str, triton_server: RunningServer,
                                                                 stream: bool) -> None:
    hf_dir = triton_server.job.hf_dir
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    prompt = _chat_prompt(messages)
    expected = _hf_text(hf_dir, prompt)
    client = _client(front_url)
    if stream:
        chunks = list(client.chat.completions.create(model="ensemble", messages=messages, stream=True,
                                                     stream_options={"include_usage": True}, **GREEDY))
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        usage = chunks[-1].usage
    else:
        answer = client.chat.completions.create(model="ensemble", messages=messages, **GREEDY)
        text = answer.choices[0].message.content
        assert answer.choices[0].message.role == "assistant"
        usage = answer.usage
    assert text == expected
    assert usage.prompt_tokens == len(_hf_tokenizer(hf_dir).encode(prompt))
    assert usage.completion_tokens == NEW_TOKENS


def test_chat_max_completion_tokens_and_tokenizer_template(triton_server: RunningServer,
                                                           tmp_path: Path) -> None:
    """The tokenizer's own template (tokenizer_config.json) is used when no --chat-template is given."""
    tokenizer_dir = tmp_path / "tokenizer"
    shutil.copytree(triton_server.job.tokenizer_dir, tokenizer_dir)
    config_path = tokenizer_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = TEMPLATE
    config_path.write_text(json.dumps(config))
    port = free_port()
    front = _start_front(OpenAISettings(triton_url=triton_server.grpc_url, tokenizer_dir=tokenizer_dir, port=port))
    try:
        messages = [{"role": "user", "content": "Hi"}]
        answer = _client(f"http://127.0.0.1:{port}").chat.completions.create(
            model="ensemble", messages=messages, temperature=0, max_completion_tokens=4,
            extra_body={"min_tokens": 4})
        assert answer.choices[0].message.content == _hf_text(triton_server.job.hf_dir, _chat_prompt(messages), 4)
        assert answer.usage.completion_tokens == 4
    finally:
        front.stop()


def test_stop_string_cuts_the_text_and_echo_prepends_the_prompt(front_url: str,
                                                               triton_server: RunningServer) -> None:
    full = _hf_text(triton_server.job.hf_dir, PROMPT)
    stop = full[len(full) // 2:len(full) // 2 + 3]
    client = _client(front_url)
    answer = client.completions.create(model="ensemble", prompt=PROMPT, stop=[stop], **GREEDY)
    assert answer.choices[0].text == full[:full.index(stop)]
    assert answer.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="ensemble", prompt=PROMPT, stop=stop, stream=True, **GREEDY) if c.choices)
    assert streamed == full[:full.index(stop)]
    echoed = client.completions.create(model="ensemble", prompt=PROMPT, echo=True, **GREEDY)
    assert echoed.choices[0].text == PROMPT + full


def test_logprobs_one_per_token(front_url: str) -> None:
    client = _client(front_url)
    answer = client.completions.create(model="ensemble", prompt=PROMPT, logprobs=0, **GREEDY)
    logprobs = answer.choices[0].logprobs
    assert len(logprobs.tokens) == NEW_TOKENS and len(logprobs.token_logprobs) == NEW_TOKENS
    assert all(value <= 0.0 for value in logprobs.token_logprobs)
    assert "".join(logprobs.tokens) == answer.choices[0].text
    chat = client.chat.completions.create(model="ensemble", messages=[{"role": "user", "content": "Hi"}],
                                          logprobs=True, **GREEDY)
    assert len(chat.choices[0].logprobs.content) == NEW_TOKENS


def test_sampling_with_a_seed_repeats(front_url: str) -> None:
    client = _client(front_url)
    texts = {client.completions.create(model="ensemble", prompt=PROMPT, temperature=0.9, top_p=0.9, seed=7,
                                       frequency_penalty=0.5, presence_penalty=0.2, max_tokens=8).choices[0].text
             for _ in range(2)}
    assert len(texts) == 1


# --- errors ---------------------------------------------------------------------------------------------


def _post(url: str, path: str, body: Any, raw: bytes | None = None) -> httpx.Response:
    return httpx.post(f"{url}{path}", content=raw if raw is not None else json.dumps(body).encode(),
                      headers={"Content-Type": "application/json"}, timeout=60)


@pytest.mark.parametrize(("body", "param"), [
    ({"n": 2}, "n"), ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"temperature": -1}, "temperature"), ({"max_tokens": "many"}, "max_tokens"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
])
def test_chat_errors_are_openai_shaped_400s(front_url: str, body: dict[str, Any], param: str) -> None:
    import openai

    request = {"model": "ensemble", "messages": [{"role": "user", "content": "Hi"}], **body}
    response = _post(front_url, "/v1/chat/completions", request)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
    with pytest.raises(openai.BadRequestError):
        _client(front_url).chat.completions.create(model="ensemble", messages=[{"role": "user", "content": "x"}],
                                                   n=2)


def test_no_chat_template_is_a_clear_400(plain_front_url: str) -> None:
    response = _post(plain_front_url, "/v1/chat/completions",
                     {"model": "ensemble", "messages": [{"role": "user", "content": "Hi"}]})
    assert response.status_code == 400
    assert "chat template" in response.json()["error"]["message"]
    assert "--chat-template" in response.json()["error"]["message"]


def test_unknown_model_is_404_and_long_prompt_is_400(front_url: str) -> None:
    response = _post(front_url, "/v1/completions", {"model": "nope", "prompt": "x"})
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    response = _post(front_url, "/v1/completions", {"model": "ensemble", "prompt": "word " * 200})
    assert response.status_code == 400 and "max_input_len" in response.json()["error"]["message"]


def test_deep_and_huge_bodies_are_refused_and_the_server_lives_on(front_url: str) -> None:
    deep = b'{"model": "ensemble", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    response = _post(front_url, "/v1/completions", None, raw=deep[:60_000])  # under the size cap: depth
    assert response.status_code == 400
    response = _post(front_url, "/v1/completions", None, raw=deep)  # over 64 KiB
    assert response.status_code == 413
    nested = {"model": "ensemble", "prompt": "x", "metadata": json.loads("[" * 40 + "]" * 40)}
    assert _post(front_url, "/v1/completions", nested).status_code == 400
    assert _post(front_url, "/v1/completions", None, raw=b"{not json").status_code == 400
    assert _client(front_url).completions.create(model="ensemble", prompt=PROMPT, **GREEDY).choices[0].text


@pytest.mark.parametrize(("path", "raw", "says"), [
    ("/v1/completions", b'{"model": "ensemble", "prompt": "caf\xe9 \xff", "max_tokens": 4}', "not valid UTF-8: byte 0xe9"),
    ("/v1/chat/completions", b'{"model": "ensemble", "messages": [{"role": "user", "content": "\xff"}]}',
     "not valid UTF-8: byte 0xff"),
    ("/v1/completions", b'{"model": "ensemble", "prompt": "hi \\udcff", "max_tokens": 4}', "prompt holds a lone"),
    ("/v1/completions", b'{"model": "ensemble", "prompt": "hi", "stop": ["\\ud800"], "stream": true}',
     "stop holds a lone"),
])
def test_text_that_is_not_utf8_is_one_400(front_url: str, path: str, raw: bytes, says: str) -> None:
    """Issue 10 item 8: undecodable bytes, or lone surrogate escapes that UTF-8 cannot carry, are one OpenAI-shaped
    400 (a lone surrogate was a 500 with a traceback in the front's log); the front serves on."""
    response = _post(front_url, path, None, raw=raw)
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert says in message and "\n" not in message and "Traceback" not in message
    assert _client(front_url).completions.create(model="ensemble", prompt=PROMPT, **GREEDY).choices[0].text


def test_triton_unreachable_is_503() -> None:
    port = free_port()
    front = _start_front(OpenAISettings(triton_url=f"127.0.0.1:{free_port()}", port=port))
    try:
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{url}/v1/models", timeout=30).status_code == 503
        response = _post(url, "/v1/completions", {"model": "ensemble", "prompt": "x"})
        assert response.status_code == 503 and "unreachable" in response.json()["error"]["message"]
    finally:
        front.stop()
