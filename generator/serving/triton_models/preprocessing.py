"""Triton python model `preprocessing`: prompt text -> token ids, stop / bad words -> [B, 2, N] lists.

Inputs and outputs as tensorrtllm_backend's inflight_batcher_llm/preprocessing (c2e65b8). Multimodal inputs are
accepted and answered with an error; the multimodal outputs are never produced (nothing maps them).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from generator.formats.tokenizer import longest_token_bytes
from generator.serving import contract
from generator.serving.triton_models.common import (
    RequestError,
    RequestInputs,
    configured_tokenizer,
    decode_strings,
    load_model_config,
    parameter,
    parse_bool,
    repository_max_input_len,
    to_word_list_format,
)

_MULTIMODAL_INPUTS = contract.PREPROCESSING.unsupported_inputs()


class TritonPythonModel:
    """The `preprocessing` model: tokenizes prompts and stop / bad words."""

    def initialize(self, args: dict[str, Any]) -> None:
        config = load_model_config(args)
        self.tokenizer = configured_tokenizer(config)
        if self.tokenizer is None:
            raise pb_utils.TritonModelException("preprocessing: parameter tokenizer_dir is not set")
        self.add_special_tokens = parse_bool(parameter(config, "add_special_tokens"), True)
        self.end_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.end_id
        # A prompt longer than this many bytes cannot fit in max_input_len tokens: it is refused before
        # tokenizing, which for megabytes takes seconds and holds up every request queued behind it.
        self.max_input_len = repository_max_input_len(args.get("model_repository", "."),
                                                      parameter(config, "gpt_model_path"))
        self.max_prompt_bytes = (None if self.max_input_len is None
                                 else self.max_input_len * longest_token_bytes(self.tokenizer))

    def execute(self, requests: list[pb_utils.InferenceRequest]) -> list[pb_utils.InferenceResponse]:
        responses = []
        for request in requests:
            try:
                responses.append(pb_utils.InferenceResponse(output_tensors=self._process(RequestInputs(request))))
            except RequestError as error:  # the request's fault (InvalidText too): one line, no traceback
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(error))))
        return responses

    def _process(self, request: RequestInputs) -> list[pb_utils.Tensor]:
        for name in _MULTIMODAL_INPUTS:
            if request.get(name) is not None:
                raise RequestError(f"input {name}: multimodal inputs are not supported by this model")
        rows = request.require("QUERY")
        if self.max_prompt_bytes is not None:
            for item in rows.reshape(-1):
                size = len(item) if isinstance(item, bytes) else len(str(item).encode("utf-8"))
                if size > self.max_prompt_bytes:
                    raise RequestError(f"text_input is {size} bytes, more than {self.max_input_len} tokens "
                                       f"(the engine's max_input_len) can hold: at most {self.max_prompt_bytes} "
                                       f"bytes with this tokenizer")
        queries = [decode_strings(row, "text_input")[0] for row in rows]
        batch_size = len(queries)
        output_len = request.require("REQUEST_OUTPUT_LEN").astype(np.int32).reshape(batch_size, -1)
        if (output_len <= 0).any():
            raise RequestError(f"max_tokens must be positive, got {output_len.reshape(-1).tolist()}")
        input_ids = []
        for query in queries:
            if query == "":
                raise RequestError("text_input is empty: send a non-empty prompt")
            ids = self.tokenizer.encode(query, add_special_tokens=self.add_special_tokens)
            if not ids:
                raise RequestError(f"text_input {query!r} encodes to no tokens")
            input_ids.append(ids)
        end_id = self._id_input(request, "END_ID", self.end_id, batch_size)
        pad_id = self._id_input(request, "PAD_ID", self.pad_id, batch_size)
        width = max(len(ids) for ids in input_ids)
        padded = np.zeros((batch_size, width), dtype=np.int32)
        for row, ids in enumerate(input_ids):
            padded[row, :] = pad_id[row, 0]
            padded[row, :len(ids)] = ids
        lengths = np.array([[len(ids)] for ids in input_ids], dtype=np.int32)
        stop_words = self._word_lists(request, "STOP_WORDS_DICT", batch_size)
        bad_words = self._word_lists(request, "BAD_WORDS_DICT", batch_size)
        extra_id = request.get("PROMPT_TABLE_EXTRA_ID")
        if extra_id is None:
            extra_ids = np.zeros((batch_size, 0), dtype=np.uint64)
        else:
            extra_ids = np.zeros((batch_size, width), dtype=np.uint64)
            extra_ids[:, :] = extra_id.reshape(batch_size, -1)[:, :1]
        return [
            pb_utils.Tensor("INPUT_ID", padded),
            pb_utils.Tensor("REQUEST_INPUT_LEN", lengths),
            # decoder-only models: the decoder input is just [pad] (the core model ignores it)
            pb_utils.Tensor("DECODER_INPUT_ID", pad_id.astype(np.int32).reshape(batch_size, 1)),
            pb_utils.Tensor("REQUEST_DECODER_INPUT_LEN", np.ones((batch_size, 1), dtype=np.int32)),
            pb_utils.Tensor("REQUEST_OUTPUT_LEN", output_len),
            pb_utils.Tensor("STOP_WORDS_IDS", stop_words),
            pb_utils.Tensor("BAD_WORDS_IDS", bad_words),
            pb_utils.Tensor("EMBEDDING_BIAS", self._embedding_bias(request, batch_size)),
            pb_utils.Tensor("OUT_END_ID", end_id),
            pb_utils.Tensor("OUT_PAD_ID", pad_id),
            pb_utils.Tensor("OUT_PROMPT_TABLE_EXTRA_IDS", extra_ids),
        ]

    def _id_input(self, request: RequestInputs, name: str, default: int | None, batch_size: int) -> np.ndarray:
        value = request.get(name)
        if value is not None:
            return value.astype(np.int32).reshape(batch_size, 1)
        if default is None:
            raise RequestError(f"the tokenizer has no eos/pad token: send {name.lower()} explicitly")
        return np.full((batch_size, 1), default, dtype=np.int32)

    def _word_lists(self, request: RequestInputs, name: str, batch_size: int) -> np.ndarray:
        value = request.get(name)
        if value is None:
            return np.zeros((batch_size, 2, 0), dtype=np.int32)
        label = {"STOP_WORDS_DICT": "stop_words", "BAD_WORDS_DICT": "bad_words"}.get(name, name)
        words = [[word for word in decode_strings(row, label) if word] for row in value.reshape(batch_size, -1)]
        return to_word_list_format(words, lambda word: self.tokenizer.encode(word, add_special_tokens=False))

    def _embedding_bias(self, request: RequestInputs, batch_size: int) -> np.ndarray:
        words = request.get("EMBEDDING_BIAS_WORDS")
        weights = request.get("EMBEDDING_BIAS_WEIGHTS")
        if words is None or weights is None:
            return np.zeros((batch_size, 0), dtype=np.float32)
        words = words.reshape(batch_size, -1)
        weights = weights.reshape(batch_size, -1)
        bias = np.zeros((batch_size, self.tokenizer.vocab_size), dtype=np.float32)
        for row in range(batch_size):
            row_words = decode_strings(words[row], "embedding_bias_words")
            if len(row_words) != len(weights[row]):
                raise RequestError("embedding_bias_words and embedding_bias_weights must have the same length")
            for word, weight in zip(row_words, weights[row], strict=True):
                for token_id in self.tokenizer.encode(word, add_special_tokens=False):
                    bias[row, token_id] += float(weight)
        return bias

    def finalize(self) -> None:
        self.tokenizer = None
