"""`gen-repo openai`: an OpenAI-compatible HTTP front (FastAPI + uvicorn) for a served gen-repo repository.

Each OpenAI request becomes one request to Triton's `ensemble` (or `tensorrt_llm_bls`) over tritonclient's
asyncio gRPC streaming API; the model names Triton serves are the OpenAI model ids. What the front does itself:
chat templates (the tokenizer's own, or `--chat-template FILE`), stop strings on the text (so the answer never
holds them, as OpenAI specifies; the engine also gets them as stop words so it stops early), `echo`, usage
counts (from the engine's `num_input_tokens` / `num_output_tokens` outputs when the ensemble has them, else the
tokenizer's count of the prompt and the number of output ids), and OpenAI-shaped errors.

Cancellation: a client that goes away cancels the gRPC stream, Triton marks the request cancelled and the
`tensorrt_llm` model cancels it in the executor (its slot is free within the model's cancellation period).

Bodies are capped in size and JSON nesting depth before anything else reads them (tritonserver 2.51's own JSON
parser crashes on very deep nesting; this front never hands JSON to Triton, but keeps the same guard).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Request, Response

from generator.errors import GenRepoError
from generator.formats.engine_dir import read_engine_dir
from generator.serving.client import input_array
from generator.serving.triton_models.common import parameter, parse_bool

DEFAULT_PORT = 9000
MODEL_SUFFIXES = ("ensemble", "tensorrt_llm_bls")
#: request fields that change nothing we do (OpenAI bookkeeping)
IGNORED_FIELDS = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key",
                  "safety_identifier", "modalities", "reasoning_effort", "verbosity", "web_search_options"}


@dataclass(frozen=True)
class OpenAISettings:
    """How to run the OpenAI-compatible front."""

    triton_url: str = "localhost:8001"           # Triton gRPC host:port
    tokenizer_dir: Path | None = None            # None: the `tokenizer_dir` of Triton's preprocessing model
    chat_template: Path | None = None            # a Jinja file; default: the tokenizer's own template
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    max_body_bytes: int = 4 << 20                # larger bodies: 413
    max_json_depth: int = 64                     # deeper JSON: 400
    request_timeout_s: float = 600.0
    trust_remote_code: bool = False
    log_level: str = "warning"


class ApiError(Exception):
    """An error answered with an OpenAI-shaped body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.kind = kind or {400: "invalid_request_error", 404: "invalid_request_error",
                             413: "invalid_request_error", 503: "service_unavailable"}.get(status, "server_error")
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param)


# --- request parsing ------------------------------------------------------------------------------------


def json_depth(value: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0), without recursion."""
    depth = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            depth = max(depth, level)
            stack.extend((child, level + 1) for child in item.values())
        elif isinstance(item, list):
            depth = max(depth, level)
            stack.extend((child, level + 1) for child in item)
    return depth


def parse_body(raw: bytes, max_depth: int) -> dict[str, Any]:
    """The request's JSON object; 400 for anything else or nesting deeper than `max_depth`."""
    # Python's own parser refuses very deep nesting with RecursionError rather than crashing
    try:
        body = json.loads(raw)
    except RecursionError:
        raise ApiError(400, f"the JSON body is nested more than {max_depth} levels deep") from None
    except UnicodeDecodeError as error:
        raise ApiError(400, f"the body is not valid UTF-8: byte 0x{raw[error.start]:02x} at offset {error.start} "
                            f"({error.reason})") from None
    except ValueError as error:
        raise ApiError(400, f"the body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    if json_depth(body) > max_depth:
        raise ApiError(400, f"the JSON body is nested more than {max_depth} levels deep")
    for key, value in body.items():
        if _has_lone_surrogate(value):
            raise _bad(key, f"{key} holds a lone UTF-16 surrogate escape (e.g. \\ud800): not valid Unicode text")
    return body


def _has_lone_surrogate(value: Any) -> bool:
    """Whether any string in parsed JSON holds a code point U+D800..U+DFFF (JSON escapes allow them; UTF-8 and
    the tokenizer do not)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


@dataclass
class GenerationParams:
    """One OpenAI request, checked and mapped onto the ensemble's inputs."""

    model: str
    prompt: str
    chat: bool
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    min_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logprobs: bool = False
    echo: bool = False


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float,
            low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(name, f"{name} must be a number, got {json.dumps(value)[:40]}")
    if value > high or value < low or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise _bad(name, f"{name} must be within {bracket}{low}, {high}], got {value}")
    return float(value)


def _integer(body: dict[str, Any], name: str, low: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, f"{name} must be an integer, got {json.dumps(value)[:40]}")
    if value < low:
        raise _bad(name, f"{name} must be >= {low}, got {value}")
    return value


def _stop_strings(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise _bad("stop", "stop must be a string or a list of strings")
    return [item for item in items if item]


def _reject_unsupported(body: dict[str, Any], chat: bool) -> None:
    """400 naming the field for everything the engine cannot honour."""
    n = body.get("n")
    if n is not None and n != 1:
        raise _bad("n", f"n={n} is not supported: the engine returns one choice per request (n=1)")
    best_of = body.get("best_of")
    if best_of is not None and best_of != 1:
        raise _bad("best_of", "best_of > 1 is not supported")
    for name in ("tools", "functions"):
        if body.get(name):
            raise _bad(name, f"{name} (tool / function calling) is not supported")
    for name in ("tool_choice", "function_call"):
        if body.get(name) not in (None, "none"):
            raise _bad(name, f"{name} is not supported (no tool calling)")
    if body.get("logit_bias"):
        raise _bad("logit_bias", "logit_bias is not supported")
    if body.get("suffix"):
        raise _bad("suffix", "suffix (insertion) is not supported")
    response_format = body.get("response_format")
    if response_format is not None and (not isinstance(response_format, dict)
                                        or response_format.get("type", "text") != "text"):
        raise _bad("response_format", "response_format other than {\"type\": \"text\"} is not supported")
    if body.get("audio") or body.get("prediction"):
        raise _bad("audio" if body.get("audio") else "prediction", "audio / predicted outputs are not supported")
    stream_options = body.get("stream_options")
    if stream_options is not None:
        if not body.get("stream"):
            raise _bad("stream_options", "stream_options is only allowed when stream is true")
        if not isinstance(stream_options, dict):
            raise _bad("stream_options", "stream_options must be an object")


def parse_common(body: dict[str, Any], chat: bool, prompt: str) -> GenerationParams:
    """The sampling fields shared by completions and chat completions."""
    _reject_unsupported(body, chat)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model", "model is required (see GET /v1/models)")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise _bad("stream", "stream must be a boolean")
    max_tokens = _integer(body, "max_tokens", 1)
    if chat and body.get("max_completion_tokens") is not None:
        max_tokens = _integer(body, "max_completion_tokens", 1)
    min_tokens = _integer(body, "min_tokens", 0)  # vLLM's extension: at least this many tokens
    if min_tokens is not None and max_tokens is not None and min_tokens > max_tokens:
        raise _bad("min_tokens", f"min_tokens ({min_tokens}) is more than max_tokens ({max_tokens})")
    seed = _integer(body, "seed", 0)
    if seed is not None and seed >= 2**64:
        raise _bad("seed", "seed must fit in 64 bits")
    params = GenerationParams(
        model=model, prompt=prompt, chat=chat, stream=stream,
        include_usage=bool((body.get("stream_options") or {}).get("include_usage", False)),
        max_tokens=max_tokens, min_tokens=min_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        seed=seed, stop=_stop_strings(body),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0))
    if chat:
        logprobs = body.get("logprobs")
        if logprobs is not None and not isinstance(logprobs, bool):
            raise _bad("logprobs", "logprobs must be a boolean")
        top = _integer(body, "top_logprobs", 0)
        if top:
            raise _bad("top_logprobs", "top_logprobs > 0 is not supported: the engine returns only the "
                                       "sampled token's log probability")
        params.logprobs = bool(logprobs)
    else:
        logprobs_n = _integer(body, "logprobs", 0)
        if logprobs_n:
            raise _bad("logprobs", "logprobs > 0 is not supported: the engine returns only the sampled token's "
                                   "log probability (use logprobs=0)")
        params.logprobs = logprobs_n is not None
        echo = body.get("echo") or False
        if not isinstance(echo, bool):
            raise _bad("echo", "echo must be a boolean")
        if echo and params.logprobs:
            raise _bad("echo", "echo with logprobs is not supported (no prompt log probabilities)")
        params.echo = echo
    return params


def completion_prompt(body: dict[str, Any]) -> str:
    """The prompt text of a completions request (one text prompt only)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list):
        if prompt and all(isinstance(item, int) for item in prompt):
            raise _bad("prompt", "prompts as token ids are not supported: send the text")
        raise _bad("prompt", "only one prompt per request is supported (a string)")
    if not isinstance(prompt, str) or not prompt:
        raise _bad("prompt", "prompt must be a non-empty string")
    return prompt


def chat_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The messages of a chat request with each content flattened to text."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "messages must be a non-empty list")
    flat = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _bad(where, f"{where} must be an object with a role")
        if message["role"] in ("tool", "function") or message.get("tool_calls"):
            raise _bad(where, f"{where}: tool messages are not supported (no tool calling)")
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise _bad(f"{where}.content", f"{where}.content: only text parts are supported")
                parts.append(part["text"])
            content = "".join(parts)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise _bad(f"{where}.content", f"{where}.content must be a string or a list of text parts")
        flat.append({**{k: v for k, v in message.items() if k in ("role", "name")}, "content": content})
    return flat


# --- chat templates -------------------------------------------------------------------------------------


def find_chat_template(tokenizer_dir: Path | None, override: Path | None) -> str | None:
    """The template text: `override`, else tokenizer_config.json's `chat_template`, else chat_template.jinja."""
    if override is not None:
        if not override.is_file():
            raise GenRepoError(f"--chat-template {override} does not exist")
        return override.read_text()
    if tokenizer_dir is None:
        return None
    config_path = tokenizer_dir / "tokenizer_config.json"
    if config_path.is_file():
        template = json.loads(config_path.read_text()).get("chat_template")
        if isinstance(template, list):  # named templates: take "default"
            named = {item.get("name"): item.get("template") for item in template if isinstance(item, dict)}
            template = named.get("default")
        if isinstance(template, str) and template:
            return template
    jinja_file = tokenizer_dir / "chat_template.jinja"
    return jinja_file.read_text() if jinja_file.is_file() else None


def _special_tokens(tokenizer_dir: Path | None) -> dict[str, str]:
    if tokenizer_dir is None or not (tokenizer_dir / "tokenizer_config.json").is_file():
        return {}
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    found = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            found[key] = value
    return found


class ChatTemplate:
    """Renders messages with the model's chat template.

    A Hugging Face tokenizer renders through its own `apply_chat_template`; others (DBRX's tiktoken wrapper,
    which we never run as remote code) through the same sandboxed Jinja setup transformers uses."""

    def __init__(self, template: str, tokenizer: Any, tokenizer_dir: Path | None) -> None:
        self.template = template
        self._hf = getattr(tokenizer, "_tokenizer", None)
        if not hasattr(self._hf, "apply_chat_template"):
            self._hf = None
        self._compiled: Any = None
        self._specials = _special_tokens(tokenizer_dir)

    def render(self, messages: list[dict[str, Any]]) -> str:
        if self._hf is not None:
            return str(self._hf.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                    add_generation_prompt=True))
        if self._compiled is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message: str) -> None:
                raise ValueError(message)

            environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            environment.globals["raise_exception"] = raise_exception
            environment.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
            self._compiled = environment.from_string(self.template)
        return str(self._compiled.render(messages=messages, add_generation_prompt=True, **self._specials))


# --- Triton ---------------------------------------------------------------------------------------------


@dataclass
class Piece:
    """What one Triton response brought: text, token ids and log probs of this piece, engine counts."""

    text: str
    token_ids: list[int]
    log_probs: list[float]
    num_input_tokens: int | None = None
    num_output_tokens: int | None = None


@dataclass
class ModelInfo:
    """What the front knows about one served model."""

    inputs: dict[str, str]                     # input name -> Triton datatype
    add_special_tokens: bool = True            # preprocessing's setting (for counting prompt tokens)
    max_input_len: int | None = None
    max_seq_len: int | None = None




def _triton_error(error: Exception) -> ApiError:
    """Map a tritonclient / gRPC error to 503 (server unreachable), 400 (the request) or 500."""
    status = error.status() if hasattr(error, "status") else None
    message = error.message() if hasattr(error, "message") else str(error)
    message = str(message or error)
    text = f"{status} {message}".lower()
    if "unavailable" in text or "failed to connect" in text or "connection refused" in text:
        return ApiError(503, f"Triton is unreachable: {message.splitlines()[0]}")
    if any(word in text for word in ("max_input_len", "max_seq_len", "not supported", "must be", "outside the",
                                     "is required", "invalid")):
        return ApiError(400, message)
    return ApiError(500, f"generation failed: {message}")


class TritonGateway:
    """The front's connection to Triton: model discovery and one streamed generation per call."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self._client: Any = None
        self._infos: dict[str, ModelInfo] = {}
        self._stopping: set[asyncio.Future[None]] = set()  # stop-by-id requests in flight

    def _get_client(self) -> Any:
        if self._client is None:
            import tritonclient.grpc.aio as aio

            self._client = aio.InferenceServerClient(self.url)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def model_names(self) -> list[str]:
        """The ready text models: `*ensemble` and `*tensorrt_llm_bls`."""
        try:
            index = await self._get_client().get_model_repository_index(as_json=True)
        except Exception as error:  # noqa: BLE001 - every client failure maps to an HTTP status
            raise _triton_error(error) from None
        return sorted(model["name"] for model in index.get("models", [])
                      if model.get("state") == "READY" and model["name"].endswith(MODEL_SUFFIXES))

    async def model_info(self, model: str) -> ModelInfo:
        if model in self._infos:
            return self._infos[model]
        if model not in await self.model_names():
            raise ApiError(404, f"the model {model!r} does not exist (see GET /v1/models)", param="model",
                           code="model_not_found")
        client = self._get_client()
        try:
            config = (await client.get_model_config(model, as_json=True))["config"]
            inputs = {item["name"]: item["data_type"].removeprefix("TYPE_").replace("STRING", "BYTES")
                      for item in config.get("input", [])}
            info = ModelInfo(inputs=inputs)
            prefix = model[:-len("ensemble")] if model.endswith("ensemble") else model[:-len("tensorrt_llm_bls")]
            pre = (await client.get_model_config(f"{prefix}preprocessing", as_json=True))["config"]
            # read as the preprocessing model itself reads it
            info.add_special_tokens = parse_bool(parameter(pre, "add_special_tokens"), True)
            core = (await client.get_model_config(f"{prefix}tensorrt_llm", as_json=True))["config"]
            engine_dir = parameter(core, "gpt_model_path") or parameter(core, "engine_dir", "")
            info.max_input_len, info.max_seq_len = _engine_limits(engine_dir)
        except ApiError:
            raise
        except Exception as error:  # noqa: BLE001
            raise _triton_error(error) from None
        self._infos[model] = info
        return info

    async def tokenizer_dir(self) -> Path | None:
        """The `tokenizer_dir` parameter of the served preprocessing model (first one found)."""
        for name in await self.model_names():
            prefix = name[:-len("ensemble")] if name.endswith("ensemble") else name[:-len("tensorrt_llm_bls")]
            try:
                config = (await self._get_client().get_model_config(f"{prefix}preprocessing", as_json=True))["config"]
            except Exception:  # noqa: BLE001 - try the next model
                continue
            found = parameter(config, "tokenizer_dir")
            if found:
                return Path(found)
        return None

    def inputs(self, info: ModelInfo, values: dict[str, Any]) -> list[Any]:
        """One InferInput per value the model declares (batch size 1)."""
        import tritonclient.grpc.aio as aio

        inputs = []
        for name, value in values.items():
            datatype = info.inputs.get(name)
            if datatype is None:
                continue
            array = input_array(datatype, value)
            infer_input = aio.InferInput(name, list(array.shape), datatype)
            infer_input.set_data_from_numpy(array)
            inputs.append(infer_input)
        return inputs

    async def generate(self, model: str, inputs: list[Any]) -> AsyncGenerator[Piece, None]:
        """Yield the pieces of one request; cancelling the consumer cancels the Triton request."""
        request = {"model_name": model, "inputs": inputs, "request_id": uuid.uuid4().hex}

        async def requests() -> AsyncIterator[dict[str, Any]]:
            # one request, then half-close: Triton ends the stream after the request's last response
            yield request

        try:
            stream = self._get_client().stream_infer(requests(), stream_timeout=self.timeout_s)
        except Exception as error:  # noqa: BLE001
            raise _triton_error(error) from None
        finished = False
        try:
            async for result, failure in stream:
                if failure is not None:
                    finished = True
                    raise _triton_error(failure)
                piece = _piece(result)
                if piece is not None:
                    yield piece
            finished = True
        except ApiError:
            raise
        except Exception as error:  # noqa: BLE001
            finished = True
            raise _triton_error(error) from None
        finally:
            if not finished:
                stream.cancel()  # the client went away (or stop text was found): free the engine's slot
                if model.endswith("ensemble"):
                    # tritonserver 2.51 does not pass an ensemble's cancellation on to its steps: stop the
                    # engine's request by id (TensorRT-LLM's `stop` input), in a task of its own
                    task = asyncio.ensure_future(self._stop_by_id(model[:-len("ensemble")] + "tensorrt_llm",
                                                                  str(request["request_id"])))
                    self._stopping.add(task)
                    task.add_done_callback(self._stopping.discard)

    async def _stop_by_id(self, core_model: str, request_id: str) -> None:
        """Send `stop=true` with `request_id` to the engine model; errors are ignored (best effort)."""
        import tritonclient.grpc.aio as aio

        values = {"input_ids": np.array([[0]], dtype=np.int32), "input_lengths": np.array([[1]], dtype=np.int32),
                  "request_output_len": np.array([[1]], dtype=np.int32), "stop": np.array([[True]], dtype=np.bool_)}
        inputs = []
        for name, array in values.items():
            infer_input = aio.InferInput(name, list(array.shape), "BOOL" if array.dtype == np.bool_ else "INT32")
            infer_input.set_data_from_numpy(array)
            inputs.append(infer_input)

        async def requests() -> AsyncIterator[dict[str, Any]]:
            yield {"model_name": core_model, "inputs": inputs, "request_id": request_id}

        try:
            async for _ in self._get_client().stream_infer(requests(), stream_timeout=30):
                pass
        except Exception:  # noqa: BLE001 - the request may be gone already
            pass


def _engine_limits(engine_dir: str) -> tuple[int | None, int | None]:
    """(max_input_len, max_seq_len) from the engine dir's config.json, when it is readable here."""
    if not engine_dir:
        return None, None
    try:
        engine = read_engine_dir(engine_dir)
    except GenRepoError:
        return None, None
    return engine.max_input_len, engine.max_seq_len


def _piece(result: Any) -> Piece | None:
    """A Piece from one InferResult; None for an empty response."""
    text = result.as_numpy("text_output")
    if text is None:
        return None
    joined = "".join(item.decode("utf-8", errors="replace") if isinstance(item, bytes) else str(item)
                     for item in np.asarray(text).reshape(-1))
    ids = result.as_numpy("output_ids")
    lengths = result.as_numpy("sequence_length")
    token_ids: list[int] = []
    if ids is not None:
        row = np.asarray(ids).reshape(-1)
        length = int(np.asarray(lengths).reshape(-1)[0]) if lengths is not None else row.size
        token_ids = [int(t) for t in row[:length]]
    log_probs_array = result.as_numpy("output_log_probs")
    log_probs = [] if log_probs_array is None else [float(x) for x in np.asarray(log_probs_array).reshape(-1)]
    log_probs = log_probs[:len(token_ids)]

    def count(name: str) -> int | None:
        value = result.as_numpy(name)
        return None if value is None else int(np.asarray(value).reshape(-1)[0])

    return Piece(joined, token_ids, log_probs, count("num_input_tokens"), count("num_output_tokens"))


# --- stop strings ---------------------------------------------------------------------------------------


class StopText:
    """Cuts streamed text at the first stop string, holding back any tail that may begin one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.buffer = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        """Text that is safe to emit now; sets `stopped` when a stop string was found."""
        if self.stopped:
            return ""
        self.buffer += piece
        if not self.stops:
            out, self.buffer = self.buffer, ""
            return out
        cut = min((index for index in (self.buffer.find(stop) for stop in self.stops) if index >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self.buffer = self.buffer[:cut], ""
            return out
        hold = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(self.buffer)), hold, -1):
                if self.buffer.endswith(stop[:size]):
                    hold = size
                    break
        out = self.buffer[:len(self.buffer) - hold]
        self.buffer = self.buffer[len(self.buffer) - hold:]
        return out

    def flush(self) -> str:
        out, self.buffer = ("" if self.stopped else self.buffer), ""
        return out


# --- generation -----------------------------------------------------------------------------------------


@dataclass
class Delta:
    """A piece of the answer as the client sees it."""

    text: str
    token_ids: list[int]
    log_probs: list[float]


@dataclass
class Outcome:
    """How a generation ended."""

    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Front:
    """The OpenAI endpoints' logic, independent of the web framework."""

    def __init__(self, settings: OpenAISettings) -> None:
        self.settings = settings
        self.gateway = TritonGateway(settings.triton_url, settings.request_timeout_s)
        self._tokenizer: Any = None
        self._tokenizer_dir: Path | None = settings.tokenizer_dir
        self._template: ChatTemplate | None = None
        self._template_loaded = False
        self._token_texts: dict[int, str] = {}
        self._longest_token_bytes = 0

    async def tokenizer(self) -> Any:
        """The tokenizer (loaded on first use; from Triton's preprocessing config without --tokenizer-dir)."""
        if self._tokenizer is None:
            from generator.formats.tokenizer import load_tokenizer

            if self._tokenizer_dir is None:
                self._tokenizer_dir = await self.gateway.tokenizer_dir()
                if self._tokenizer_dir is None:
                    raise ApiError(500, "no tokenizer: pass --tokenizer-dir (the served preprocessing model names "
                                        "none)")
            from generator.formats.tokenizer import longest_token_bytes

            tokenizer = await asyncio.to_thread(load_tokenizer, self._tokenizer_dir, self.settings.trust_remote_code)
            self._longest_token_bytes = await asyncio.to_thread(longest_token_bytes, tokenizer)
            self._tokenizer = tokenizer
        return self._tokenizer

    async def chat_template(self) -> ChatTemplate:
        tokenizer = await self.tokenizer()
        if not self._template_loaded:
            template = find_chat_template(self._tokenizer_dir, self.settings.chat_template)
            self._template = None if template is None else ChatTemplate(template, tokenizer, self._tokenizer_dir)
            self._template_loaded = True
        if self._template is None:
            raise ApiError(400, "this model's tokenizer has no chat template: use /v1/completions, or start the "
                                "server with --chat-template FILE", param="messages", code="no_chat_template")
        return self._template

    async def chat_prompt(self, messages: list[dict[str, Any]]) -> str:
        template = await self.chat_template()
        try:
            return template.render(messages)
        except Exception as error:  # noqa: BLE001 - a template's raise_exception() or a Jinja error
            raise ApiError(400, f"the chat template failed on these messages: {error}", param="messages") from None

    def token_text(self, token_id: int) -> str:
        if token_id not in self._token_texts:
            self._token_texts[token_id] = str(self._tokenizer.decode([token_id], skip_special_tokens=False))
        return self._token_texts[token_id]

    async def run(self, params: GenerationParams, outcome: Outcome) -> AsyncGenerator[Delta, None]:
        """Generate: yield the answer's deltas (stop strings cut out), fill `outcome` at the end."""
        info = await self.gateway.model_info(params.model)
        tokenizer = await self.tokenizer()
        if info.max_input_len is not None and self._longest_token_bytes:
            # more bytes than max_input_len of the longest tokens can hold: refuse it without tokenizing it
            size = len(params.prompt.encode("utf-8", errors="replace"))
            limit = info.max_input_len * self._longest_token_bytes
            if size > limit:
                raise _bad("messages" if params.chat else "prompt",
                           f"the prompt is {size} bytes, more than the engine's max_input_len "
                           f"{info.max_input_len} tokens can hold (at most {limit} bytes with this tokenizer)")
        prompt_ids = await asyncio.to_thread(tokenizer.encode, params.prompt, info.add_special_tokens)
        if info.max_input_len is not None and len(prompt_ids) > info.max_input_len:
            raise _bad("messages" if params.chat else "prompt",
                       f"the prompt has {len(prompt_ids)} tokens, more than the engine's max_input_len "
                       f"{info.max_input_len}")
        max_tokens = params.max_tokens
        if max_tokens is None:
            room = None if info.max_seq_len is None else info.max_seq_len - len(prompt_ids)
            max_tokens = (room if params.chat and room else None) or 16  # OpenAI's completions default is 16
        if info.max_seq_len is not None and len(prompt_ids) + max_tokens > info.max_seq_len:
            raise _bad("max_completion_tokens" if params.chat and params.max_tokens else "max_tokens",
                       f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) is more than the engine's "
                       f"max_seq_len {info.max_seq_len}")
        values: dict[str, Any] = {
            "text_input": params.prompt, "max_tokens": max_tokens, "stream": params.stream,
            "exclude_input_in_output": True, "frequency_penalty": params.frequency_penalty,
            "presence_penalty": params.presence_penalty, "return_log_probs": params.logprobs,
            "return_num_input_tokens": True, "return_num_output_tokens": True,
        }
        if params.temperature == 0.0:
            values.update(top_k=1, top_p=0.0)  # greedy
        else:
            values.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
        if params.seed is not None:
            values["seed" if "seed" in info.inputs else "random_seed"] = params.seed
        if params.min_tokens:
            values["min_tokens"] = params.min_tokens
        if params.stop:
            values["stop_words"] = params.stop  # the engine stops early; the text is cut here
        stop = StopText(params.stop)
        outcome.prompt_tokens = len(prompt_ids)
        generated = 0
        received: list[str] = []
        engine_output_tokens: int | None = None
        if params.echo:
            yield Delta(params.prompt, [], [])
        pieces = self.gateway.generate(params.model, self.gateway.inputs(info, values))
        async with aclosing(pieces):  # leaving early closes the stream at once, which cancels the request
            async for piece in pieces:
                generated += len(piece.token_ids)
                if piece.num_input_tokens is not None:
                    outcome.prompt_tokens = piece.num_input_tokens
                if piece.num_output_tokens is not None:  # each response counts the tokens it carries
                    engine_output_tokens = (engine_output_tokens or 0) + piece.num_output_tokens
                received.append(piece.text)
                text = stop.push(piece.text)
                if text or piece.token_ids:
                    yield Delta(text, piece.token_ids, piece.log_probs)
                if stop.stopped:
                    break  # leaving the loop cancels the Triton request
        tail = stop.flush()
        if tail:
            yield Delta(tail, [], [])
        outcome.completion_tokens = engine_output_tokens if engine_output_tokens is not None else generated
        if engine_output_tokens is None and generated == 0 and received:
            # the BLS returns text only: count its tokens with the tokenizer
            outcome.completion_tokens = len(tokenizer.encode("".join(received), False))
        if stop.stopped:
            outcome.finish_reason = "stop"
        else:
            outcome.finish_reason = "length" if outcome.completion_tokens >= max_tokens else "stop"


# --- response shapes ------------------------------------------------------------------------------------


def _usage(outcome: Outcome) -> dict[str, int]:
    return {"prompt_tokens": outcome.prompt_tokens, "completion_tokens": outcome.completion_tokens,
            "total_tokens": outcome.prompt_tokens + outcome.completion_tokens}


class LogProbs:
    """Accumulates log probs in the completions (`tokens` / `token_logprobs` / `text_offset`) or chat shape."""

    def __init__(self, front: Front, chat: bool, offset: int = 0) -> None:
        self.front = front
        self.chat = chat
        self.offset = offset

    def of(self, delta: Delta) -> dict[str, Any] | None:
        tokens = [self.front.token_text(t) for t in delta.token_ids]
        values = delta.log_probs + [0.0] * (len(tokens) - len(delta.log_probs))
        if self.chat:
            return {"content": [{"token": token, "logprob": value, "bytes": list(token.encode()), "top_logprobs": []}
                                for token, value in zip(tokens, values, strict=True)]}
        offsets = []
        for token in tokens:
            offsets.append(self.offset)
            self.offset += len(token)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": None, "text_offset": offsets}

    @staticmethod
    def merge(parts: list[dict[str, Any]], chat: bool) -> dict[str, Any]:
        if chat:
            return {"content": [item for part in parts for item in part["content"]]}
        return {"tokens": [t for p in parts for t in p["tokens"]],
                "token_logprobs": [v for p in parts for v in p["token_logprobs"]], "top_logprobs": None,
                "text_offset": [o for p in parts for o in p["text_offset"]]}


async def complete(front: Front, params: GenerationParams) -> dict[str, Any]:
    """A whole (non-streamed) completion or chat completion body."""
    outcome = Outcome()
    texts: list[str] = []
    logprob_parts: list[dict[str, Any]] = []
    logprobs = LogProbs(front, params.chat, offset=len(params.prompt) if params.echo else 0)
    async for delta in front.run(params, outcome):
        texts.append(delta.text)
        if params.logprobs and delta.token_ids:
            part = logprobs.of(delta)
            if part is not None:
                logprob_parts.append(part)
    text = "".join(texts)
    merged = LogProbs.merge(logprob_parts, params.chat) if params.logprobs else None
    created = int(time.time())
    if params.chat:
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": created,
                "model": params.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": merged, "finish_reason": outcome.finish_reason}],
                "usage": _usage(outcome)}
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": created,
            "model": params.model,
            "choices": [{"index": 0, "text": text, "logprobs": merged, "finish_reason": outcome.finish_reason}],
            "usage": _usage(outcome)}


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


async def stream_events(front: Front, params: GenerationParams, first: Delta | None,
                        deltas: AsyncGenerator[Delta, None], outcome: Outcome) -> AsyncIterator[bytes]:
    """The server-sent events of a streamed answer, ending with `data: [DONE]`."""
    created = int(time.time())
    ident = f"{'chatcmpl' if params.chat else 'cmpl'}-{uuid.uuid4().hex}"
    kind = "chat.completion.chunk" if params.chat else "text_completion"
    logprobs = LogProbs(front, params.chat, offset=len(params.prompt) if params.echo else 0)

    def chunk(choice: dict[str, Any] | None, usage: dict[str, int] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"id": ident, "object": kind, "created": created, "model": params.model,
                                "choices": [] if choice is None else [choice]}
        if params.include_usage:
            body["usage"] = usage
        return body

    def choice(delta: Delta | None, finish: str | None, role: bool = False) -> dict[str, Any]:
        part = logprobs.of(delta) if (params.logprobs and delta is not None and delta.token_ids) else None
        text = "" if delta is None else delta.text
        if params.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text} if role else (
                {"content": text} if delta is not None else {})
            return {"index": 0, "delta": message, "logprobs": part, "finish_reason": finish}
        return {"index": 0, "text": text, "logprobs": part, "finish_reason": finish}

    try:
        if params.chat:
            yield _sse(chunk(choice(Delta("", [], []), None, role=True)))
        if first is not None:
            yield _sse(chunk(choice(first, None)))
        async for delta in deltas:
            yield _sse(chunk(choice(delta, None)))
        yield _sse(chunk(choice(None, outcome.finish_reason)))
        if params.include_usage:
            yield _sse(chunk(None, _usage(outcome)))
    except ApiError as error:
        yield _sse(error.body())
    finally:
        await deltas.aclose()  # a client gone mid-stream: close the Triton stream now, which cancels the request
    yield _sse("[DONE]")


# --- the web app ----------------------------------------------------------------------------------------


def create_app(settings: OpenAISettings) -> Any:
    """The FastAPI app serving /v1/models, /v1/completions, /v1/chat/completions and /health."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse

    front = Front(settings)
    if settings.chat_template is not None:
        find_chat_template(None, settings.chat_template)  # a missing file fails at start, not per request

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        yield
        await front.gateway.close()

    app = FastAPI(title="gen-repo OpenAI-compatible API", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.front = front

    def error_response(error: ApiError) -> Response:
        return JSONResponse(error.body(), status_code=error.status)

    async def read_body(request: Request) -> dict[str, Any]:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > settings.max_body_bytes:
            raise ApiError(413, f"the body is larger than {settings.max_body_bytes} bytes")
        chunks = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > settings.max_body_bytes:
                raise ApiError(413, f"the body is larger than {settings.max_body_bytes} bytes")
            chunks.append(chunk)
        return parse_body(b"".join(chunks), settings.max_json_depth)

    async def handle(request: Request, chat: bool) -> Response:
        try:
            body = await read_body(request)
            if chat:
                prompt = await front.chat_prompt(chat_messages(body))
            else:
                prompt = completion_prompt(body)
            params = parse_common(body, chat, prompt)
            if not params.stream:
                return await _until_disconnected(request, complete(front, params))
            outcome = Outcome()
            deltas = front.run(params, outcome)
            # the first delta is awaited here, so that errors before any output are HTTP errors, not events
            try:
                first: Delta | None = await deltas.__anext__()
            except StopAsyncIteration:
                first = None
            return StreamingResponse(stream_events(front, params, first, deltas, outcome),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        except ApiError as error:
            return error_response(error)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await handle(request, chat=True)

    @app.get("/v1/models")
    async def models() -> Response:
        try:
            names = await front.gateway.model_names()
        except ApiError as error:
            return error_response(error)
        created = int(time.time())
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "gen-repo"} for name in names]})

    @app.get("/v1/models/{name}")
    async def model(name: str) -> Response:
        try:
            if name not in await front.gateway.model_names():
                raise ApiError(404, f"the model {name!r} does not exist", param="model", code="model_not_found")
        except ApiError as error:
            return error_response(error)
        return JSONResponse({"id": name, "object": "model", "created": int(time.time()), "owned_by": "gen-repo"})

    @app.get("/health")
    async def health() -> Response:
        try:
            await front.gateway.model_names()
        except ApiError as error:
            return error_response(error)
        return JSONResponse({"status": "ok"})

    return app


async def _until_disconnected(request: Any, work: Any) -> Any:
    """Run `work` (a coroutine returning the body) unless the client disconnects first (then cancel it)."""
    from fastapi.responses import JSONResponse

    task = asyncio.ensure_future(work)
    while not task.done():
        done, _ = await asyncio.wait({task}, timeout=0.25)
        if not done and await request.is_disconnected():
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, ApiError):
                pass
            return JSONResponse({"error": {"message": "client disconnected"}}, status_code=499)
    try:
        return JSONResponse(task.result())
    except ApiError as error:
        return JSONResponse(error.body(), status_code=error.status)


def run_openai(settings: OpenAISettings) -> None:
    """`gen-repo openai`: serve the front in the foreground until Ctrl-C."""
    import click
    import uvicorn

    app = create_app(settings)
    click.echo(f"OpenAI-compatible API on http://{settings.host}:{settings.port}/v1 -> Triton gRPC "
               f"{settings.triton_url}; Ctrl-C stops it.")
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level)


class BackgroundFront:
    """The front on a thread of this process (`gen-repo serve --openai-port`): start, wait ready, stop."""

    def __init__(self, settings: OpenAISettings) -> None:
        import uvicorn

        config = uvicorn.Config(create_app(settings), host=settings.host, port=settings.port,
                                log_level=settings.log_level, lifespan="on")
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, name="gen-repo-openai", daemon=True)

    def start(self, timeout_s: float = 30.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise GenRepoError("the OpenAI-compatible server did not start (is its port free?)")
            time.sleep(0.05)

    def stop(self, timeout_s: float = 10.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout_s)


def wait_until_listening(host: str, port: int, timeout_s: float, alive: Callable[[], bool]) -> None:
    """Poll /health until it answers (any status) or `timeout_s` passes."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and alive():
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.1)
    raise GenRepoError(f"the OpenAI-compatible server on {host}:{port} did not answer within {timeout_s:.0f} s")
