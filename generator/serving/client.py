"""`gen-repo infer`: send a prompt to the served `ensemble` (or `tensorrt_llm_bls`) and print the answer.

gRPC always goes through the streaming API (`start_stream` / `async_stream_infer`): the ensemble is decoupled
(its tensorrt_llm step is), and Triton refuses unary inference on decoupled models. With `stream` off the
model sends one response holding the whole text. HTTP uses Triton's generate extension:
`/v2/models/<model>/generate`, or `/generate_stream` (server-sent events) when streaming.
"""

from __future__ import annotations

import json
import queue
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import click
import numpy as np

from generator.errors import GenRepoError

DEFAULT_URLS = {"grpc": "localhost:8001", "http": "localhost:8000"}
# Inputs that changed name between tensorrtllm_backend versions: ours -> the other spelling.
INPUT_ALIASES = {"seed": "random_seed"}
# Triton datatype name -> numpy dtype, for the inputs this client sends.
_NUMPY_TYPES: dict[str, Any] = {"INT32": np.int32, "INT64": np.int64, "UINT64": np.uint64, "FP32": np.float32,
                                "FP16": np.float16, "FP64": np.float64, "BOOL": np.bool_, "BYTES": np.object_}


@dataclass(frozen=True)
class InferSettings:
    """One generation request. None leaves the choice to the model's defaults."""

    prompt: str
    url: str | None = None                   # host:port; default localhost:8001 (grpc) / localhost:8000 (http)
    protocol: str = "grpc"                   # "grpc" or "http"
    model: str = "ensemble"                  # or "tensorrt_llm_bls"
    stream: bool = False
    max_tokens: int = 32
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_words: tuple[str, ...] = ()
    bad_words: tuple[str, ...] = ()
    end_id: int | None = None
    pad_id: int | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    exclude_input_in_output: bool | None = None
    wait_s: float = 0.0                      # wait this long for the server and model to be ready
    timeout_s: float = 300.0


@dataclass
class InferOutput:
    """The answer: the joined text, the pieces as they arrived, and any extra outputs of the last response."""

    text: str
    pieces: list[str] = field(default_factory=list)
    outputs: dict[str, Any] = field(default_factory=dict)


def request_inputs(settings: InferSettings) -> dict[str, Any]:
    """The model's input names and values for `settings` (the ensemble's names; None fields left out)."""
    values: dict[str, Any] = {
        "text_input": settings.prompt, "max_tokens": settings.max_tokens, "stream": settings.stream,
        "temperature": settings.temperature, "top_k": settings.top_k, "top_p": settings.top_p,
        "seed": settings.seed, "end_id": settings.end_id, "pad_id": settings.pad_id,
        "repetition_penalty": settings.repetition_penalty, "presence_penalty": settings.presence_penalty,
        "frequency_penalty": settings.frequency_penalty,
        "exclude_input_in_output": settings.exclude_input_in_output,
        "stop_words": list(settings.stop_words) or None, "bad_words": list(settings.bad_words) or None,
    }
    return {name: value for name, value in values.items() if value is not None}


def generate(settings: InferSettings, on_piece: Callable[[str], None] | None = None) -> InferOutput:
    """Send the request and return the answer; `on_piece` sees each streamed piece as it arrives."""
    if settings.protocol not in DEFAULT_URLS:
        raise GenRepoError(f"unknown protocol {settings.protocol!r}: use grpc or http")
    url = settings.url or DEFAULT_URLS[settings.protocol]
    _check_text(request_inputs(settings))
    if settings.wait_s > 0:
        wait_for_model(url, settings.protocol, settings.model, settings.wait_s)
    # Streamed responses carry only new tokens whatever exclude_input_in_output says (as TensorRT-LLM's
    # executor streams), so a streamed answer that should repeat the prompt gets it from here, first.
    echo = settings.stream and settings.exclude_input_in_output is False
    if echo and on_piece is not None:
        on_piece(settings.prompt)
    if settings.protocol == "grpc":
        output = _generate_grpc(url, settings, on_piece)
    else:
        output = _generate_http(url, settings, on_piece)
    if echo:
        output.pieces.insert(0, settings.prompt)
        output.text = settings.prompt + output.text
    return output


def _check_text(values: dict[str, Any]) -> None:
    """`GenRepoError` for text that cannot be sent as UTF-8 (e.g. undecodable bytes given on the command line)."""
    for name, value in values.items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str):
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError as error:
                    raise GenRepoError(f"{name} is not valid UTF-8 text (character {error.start}: "
                                       f"{item[error.start]!r})") from None


def infer(settings: InferSettings) -> InferOutput:
    """`gen-repo infer`: generate and print the text (streamed pieces as they arrive)."""
    def show(piece: str) -> None:
        click.echo(piece, nl=False)

    output = generate(settings, on_piece=show if settings.stream else None)
    click.echo(output.text if not settings.stream else "")
    return output


def wait_for_model(url: str, protocol: str, model: str, timeout_s: float) -> None:
    """Poll until the server is ready and `model` is loaded; `GenRepoError` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    last_error = "no answer"
    while time.monotonic() < deadline:
        try:
            if protocol == "grpc":
                import tritonclient.grpc as grpcclient

                with grpcclient.InferenceServerClient(url) as client:
                    if client.is_server_ready() and client.is_model_ready(model):
                        return
                    last_error = f"model {model} not ready"
            else:
                with urllib.request.urlopen(f"{_http_base(url)}/v2/models/{model}/ready", timeout=2) as response:
                    if response.status == 200:
                        return
        except Exception as error:  # connection refused while the server starts: keep polling
            last_error = str(error).splitlines()[0] if str(error) else type(error).__name__
        time.sleep(0.5)
    raise GenRepoError(f"{model} at {url} was not ready after {timeout_s:.0f} s ({last_error})")


# --- gRPC -----------------------------------------------------------------------------------------------


def model_inputs(url: str, model: str) -> dict[str, str]:
    """`{input name: Triton datatype}` of `model`, from its config."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    try:
        with grpcclient.InferenceServerClient(url) as client:
            config = client.get_model_config(model, as_json=True)["config"]
    except InferenceServerException as error:
        raise GenRepoError(f"cannot read the config of {model} at {url}: {error.message()}") from None
    return {item["name"]: item["data_type"].removeprefix("TYPE_").replace("STRING", "BYTES")
            for item in config.get("input", [])}


def input_array(datatype: str, value: Any) -> np.ndarray:
    """A batch-1 array of `value` (a scalar or a list) as Triton datatype `datatype` wants it."""
    items = value if isinstance(value, list) else [value]
    if datatype == "BYTES":
        return np.array([[str(item).encode() for item in items]], dtype=np.object_)
    return np.array([items], dtype=_NUMPY_TYPES[datatype])


def build_grpc_inputs(values: dict[str, Any], input_types: dict[str, str], model: str) -> list[Any]:
    """One `InferInput` per value, batch size 1, typed as the model declares."""
    import tritonclient.grpc as grpcclient

    inputs = []
    for name, value in values.items():
        if name not in input_types and INPUT_ALIASES.get(name) in input_types:
            name = INPUT_ALIASES[name]
        if name not in input_types:
            raise GenRepoError(f"model {model} has no input {name!r} (it has: {', '.join(sorted(input_types))})")
        datatype = input_types[name]
        array = input_array(datatype, value)
        infer_input = grpcclient.InferInput(name, list(array.shape), datatype)
        infer_input.set_data_from_numpy(array)
        inputs.append(infer_input)
    return inputs


def stream_grpc(url: str, model: str, inputs: list[Any], timeout_s: float) -> Iterator[Any]:
    """Yield each `InferResult` of one request on a gRPC stream until the final response."""
    import tritonclient.grpc as grpcclient

    responses: queue.Queue[tuple[Any, Any]] = queue.Queue()

    def callback(result: Any, error: Any) -> None:  # tritonclient passes these as keyword arguments
        responses.put((result, error))

    client = grpcclient.InferenceServerClient(url)
    finished = False  # the server is done with the request: no need to cancel it
    try:
        client.start_stream(callback=callback)
        client.async_stream_infer(model, inputs, enable_empty_final_response=True)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                result, error = responses.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise GenRepoError(f"no answer from {model} within {timeout_s:.0f} s") from None
            if error is not None:
                finished = True
                message = error.message() if hasattr(error, "message") else str(error)
                raise GenRepoError(f"{model}: {message}")
            finished = bool(result.get_response().parameters["triton_final_response"].bool_param)
            yield result
            if finished:
                return
    finally:
        # Cancelling a request the server already finished or rejected leaves the ensemble "live" in
        # tritonserver 2.51, and its shutdown then waits out the whole exit timeout.
        client.stop_stream(cancel_requests=not finished)
        client.close()


def _generate_grpc(url: str, settings: InferSettings, on_piece: Callable[[str], None] | None) -> InferOutput:
    inputs = build_grpc_inputs(request_inputs(settings), model_inputs(url, settings.model), settings.model)
    output = InferOutput(text="")
    for result in stream_grpc(url, settings.model, inputs, settings.timeout_s):
        text = result.as_numpy("text_output")
        if text is None:  # the empty final response
            continue
        piece = "".join(item.decode("utf-8", errors="replace") if isinstance(item, bytes) else str(item)
                        for item in np.asarray(text).reshape(-1))
        output.pieces.append(piece)
        if on_piece is not None:
            on_piece(piece)
        for out in result.get_response().outputs:
            if out.name != "text_output":
                output.outputs[out.name] = result.as_numpy(out.name)
    output.text = "".join(output.pieces)
    return output


# --- HTTP -----------------------------------------------------------------------------------------------


def _http_base(url: str) -> str:
    return url.rstrip("/") if url.startswith(("http://", "https://")) else f"http://{url.rstrip('/')}"


def _generate_http(url: str, settings: InferSettings, on_piece: Callable[[str], None] | None) -> InferOutput:
    endpoint = "generate_stream" if settings.stream else "generate"
    body = json.dumps(request_inputs(settings)).encode()
    request = urllib.request.Request(f"{_http_base(url)}/v2/models/{settings.model}/{endpoint}", data=body,
                                     headers={"Content-Type": "application/json"}, method="POST")
    output = InferOutput(text="")
    try:
        with urllib.request.urlopen(request, timeout=settings.timeout_s) as response:
            if settings.stream:
                for event in _server_sent_events(response):
                    _http_piece(event, settings.model, output, on_piece)
            else:
                _http_piece(json.loads(response.read()), settings.model, output, on_piece)
    except urllib.error.HTTPError as error:
        detail = error.read().decode(errors="replace")
        try:
            detail = json.loads(detail).get("error", detail)
        except ValueError:
            pass
        raise GenRepoError(f"{settings.model}: HTTP {error.code}: {detail}") from None
    except urllib.error.URLError as error:
        raise GenRepoError(f"cannot reach {url}: {error.reason}") from None
    output.text = "".join(output.pieces)
    return output


def _server_sent_events(response: Any) -> Iterator[dict[str, Any]]:
    for raw in response:
        line = raw.decode("utf-8").strip()
        if line.startswith("data:"):
            yield json.loads(line[len("data:"):].strip())


def _http_piece(event: dict[str, Any], model: str, output: InferOutput,
                on_piece: Callable[[str], None] | None) -> None:
    # Triton answers some failures with HTTP 200 and an {"error": ...} body (or SSE event).
    if "error" in event:
        raise GenRepoError(f"{model}: {event['error']}")
    text = event.get("text_output", "")
    piece = "".join(text) if isinstance(text, list) else str(text)
    output.pieces.append(piece)
    if on_piece is not None:
        on_piece(piece)
    output.outputs.update({k: v for k, v in event.items()
                           if k not in ("text_output", "model_name", "model_version")})
