"""Helpers shared by the python-backend models (they run inside Triton's python stub, which imports this module
from the installed `generator` package). Nothing here imports `triton_python_backend_utils`, so it is testable
without a server.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

import numpy as np

if TYPE_CHECKING:  # only importable inside the stub; mypy reads stubs/triton_python_backend_utils.pyi
    import triton_python_backend_utils as pb_utils

_TRUE = {"true", "1", "t", "y", "yes", "on"}
_FALSE = {"false", "0", "f", "n", "no", "off"}


@overload
def parameter(model_config: dict[str, Any], key: str) -> str | None: ...
@overload
def parameter(model_config: dict[str, Any], key: str, default: str) -> str: ...
@overload
def parameter(model_config: dict[str, Any], key: str, default: str | None) -> str | None: ...
def parameter(model_config: dict[str, Any], key: str, default: str | None = None) -> str | None:
    """A `parameters` string of config.pbtxt; empty or unfilled (`${...}`) values count as unset."""
    value = model_config.get("parameters", {}).get(key, {}).get("string_value")
    if value is None or value == "" or value.startswith("${"):
        return default
    return str(value)


def parse_bool(text: str | None, default: bool) -> bool:
    """true/false/1/0/t/f/y/n/yes/no (any case); anything else gives `default`."""
    if text is None:
        return default
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    return default


class RequestError(ValueError):
    """A request the model answers with an error response carrying this message."""


class RequestInputs:
    """A Triton request's input tensors, indexed by name once.

    `pb_utils.get_input_tensor_by_name` lists and scans all inputs on every call, and parsing a tensorrt_llm
    request asks for some 50 names: that was most of its `execute` time."""

    def __init__(self, request: pb_utils.InferenceRequest) -> None:
        self.request = request
        self._tensors = {tensor.name(): tensor for tensor in request.inputs()}

    def get(self, name: str) -> np.ndarray | None:
        """The input `name` as numpy, None when the client did not send it."""
        tensor = self._tensors.get(name)
        return None if tensor is None else tensor.as_numpy()

    def require(self, name: str) -> np.ndarray:
        """A required input (Triton refuses requests without it; a `RequestError` all the same)."""
        array = self.get(name)
        if array is None:
            raise RequestError(f"input {name} is required")
        return array


def is_cancelled(request: pb_utils.InferenceRequest) -> bool:
    """Whether the client cancelled `request`; a request Triton no longer knows counts as not cancelled."""
    try:
        return bool(request.is_cancelled())
    except Exception:
        return False


def load_model_config(args: dict[str, Any]) -> dict[str, Any]:
    """The model's config as a dict, from the `args` Triton passes to `initialize`."""
    return dict(json.loads(args["model_config"]))


def configured_tokenizer(model_config: dict[str, Any]) -> Any:
    """The tokenizer the `tokenizer_dir` / `trust_remote_code` parameters name, or None without a dir."""
    from generator.formats.tokenizer import load_tokenizer

    tokenizer_dir = parameter(model_config, "tokenizer_dir")
    if tokenizer_dir is None:
        return None
    return load_tokenizer(tokenizer_dir, trust_remote_code=parse_bool(parameter(model_config, "trust_remote_code"),
                                                                      False))


def repository_max_input_len(model_dir: str | Path, engine_dir: str | None) -> int | None:
    """The largest `max_input_len` of the engines this repository serves: `engine_dir` and every sibling model's
    `gpt_model_path` (a shared preprocessing serves several engines). None when no engine config is readable."""
    from generator.errors import GenRepoError
    from generator.formats.engine_dir import read_engine_dir
    from generator.serving.pbtxt import model_parameter

    engine_dirs = [engine_dir] if engine_dir else []
    for config_file in Path(model_dir).resolve().parent.glob("*/config.pbtxt"):
        sibling_engine = model_parameter(config_file, "gpt_model_path")
        if sibling_engine is not None:
            engine_dirs.append(sibling_engine)
    limits = []
    for directory in engine_dirs:
        try:
            limits.append(read_engine_dir(directory).max_input_len)
        except GenRepoError:
            continue  # an unreadable or foreign engine dir; the engine itself still checks its limit
    return max(limits, default=None)


def to_word_list_format(word_lists: list[list[str]], encode: Callable[[str], list[int]]) -> np.ndarray:
    """Stop / bad words per batch item -> INT32 [batch, 2, N]: row 0 the concatenated ids (padded with 0),
    row 1 the cumulative end offsets (padded with -1), as TensorRT-LLM expects. Empty words are skipped."""
    flat_ids: list[list[int]] = []
    offsets: list[list[int]] = []
    for words in word_lists:
        ids: list[int] = []
        ends: list[int] = []
        for word in words:
            word_ids = encode(word)
            if not word_ids:
                continue
            ids.extend(word_ids)
            ends.append(len(ids))
        flat_ids.append(ids)
        offsets.append(ends)
    width = max([1, *[len(ids) for ids in flat_ids]])
    out = np.zeros((len(word_lists), 2, width), dtype=np.int32)
    out[:, 1, :] = -1
    for row, (ids, ends) in enumerate(zip(flat_ids, offsets, strict=True)):
        out[row, 0, :len(ids)] = ids
        out[row, 1, :len(ends)] = ends
    return out


def from_word_list_format(word_list: np.ndarray) -> list[list[int]]:
    """One batch item's [2, N] stop / bad word array -> the token sequences it holds."""
    array = np.asarray(word_list).reshape(2, -1)
    ids, ends = array[0], array[1]
    sequences: list[list[int]] = []
    start = 0
    for end in ends:
        end = int(end)
        if end < 0:
            break
        if end > start:
            sequences.append([int(token) for token in ids[start:end]])
        start = end
    return sequences


class InvalidText(RequestError):
    """A BYTES input that is not UTF-8 text: the request's fault, answered with this one-line message."""


def decode_strings(array: np.ndarray, name: str = "input") -> list[str]:
    """A numpy array of Triton BYTES (bytes or str objects) -> list of str; `InvalidText` names `name` and the
    first byte that is not UTF-8."""
    out = []
    for item in np.asarray(array).reshape(-1):
        if not isinstance(item, bytes):
            out.append(str(item))
            continue
        try:
            out.append(item.decode("utf-8"))
        except UnicodeDecodeError as error:
            raise InvalidText(f"{name} is not valid UTF-8: byte 0x{item[error.start]:02x} at offset {error.start} "
                              f"({error.reason})") from None
    return out


class Utf8HoldBack:
    """Streaming guard: holds back new tokens while they decode to an incomplete UTF-8 character.

    A byte-level BPE token can carry half of a multi-byte character; decoding it alone gives U+FFFD. We keep
    such tokens until the character completes (the decode of the held tokens no longer ends in U+FFFD), and give
    up after `MAX_HELD` tokens, since one character spans at most 4 bytes: what still ends in U+FFFD then is an
    invalid sequence that waiting cannot fix.
    """

    MAX_HELD = 4

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self._held: list[int] = []

    def push(self, token_ids: list[int]) -> list[int]:
        """Add new tokens; return those that can be sent now (possibly none)."""
        self._held.extend(int(token) for token in token_ids)
        if not self._held:
            return []
        if len(self._held) < self.MAX_HELD and self._decode(self._held).endswith("\ufffd"):
            return []
        ready, self._held = self._held, []
        return ready

    def flush(self) -> list[int]:
        """Everything still held (at the end of the stream)."""
        ready, self._held = self._held, []
        return ready


class ChunkDecoder:
    """Decodes a chunk of a longer sequence so that decoded chunks concatenate to the decoded sequence.

    Byte-level BPE and tiktoken decode chunks faithfully on their own. SentencePiece-style decoders (Metaspace)
    drop the leading space of whatever they decode first, which would glue streamed words together; for those
    we decode a fixed one-token prefix plus the chunk and cut the prefix's text off again.
    """

    PROBE = "x y z"

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._prefix: list[int] = []
        self._prefix_text = ""
        probe_ids = tokenizer.encode(self.PROBE, add_special_tokens=False)
        one_by_one = "".join(tokenizer.decode([i], skip_special_tokens=False) for i in probe_ids)
        if one_by_one != tokenizer.decode(probe_ids, skip_special_tokens=False):
            self._prefix = tokenizer.encode("x", add_special_tokens=False)
            self._prefix_text = tokenizer.decode(self._prefix, skip_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        """Text of `ids` as it appears inside a longer text (leading spaces kept)."""
        if not self._prefix or not ids:
            return str(self._tokenizer.decode(ids, skip_special_tokens=self._skip))
        text = str(self._tokenizer.decode(self._prefix + list(ids), skip_special_tokens=self._skip))
        if text.startswith(self._prefix_text):
            return text[len(self._prefix_text):]
        return str(self._tokenizer.decode(ids, skip_special_tokens=self._skip))
