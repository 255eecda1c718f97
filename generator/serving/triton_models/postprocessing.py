"""Triton python model `postprocessing`: token ids -> text.

Inputs and outputs as TensorRT-LLM's inflight_batcher_llm/postprocessing, plus OUT_TOKENS_BATCH /
OUT_SEQUENCE_LENGTH: the inputs handed on unchanged, which the ensemble returns as output_ids / sequence_length
(an ensemble output must not also feed a step, see templates/ensemble.pbtxt.j2). Each beam is cut to
its SEQUENCE_LENGTH and decoded without space clean-up (`ChunkDecoder`), so that the chunks of a stream, joined,
equal the text of the whole sequence (tensorrt_llm never splits a multi-byte character across two chunks).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from generator.serving.triton_models.common import (
    ChunkDecoder,
    RequestInputs,
    configured_tokenizer,
    load_model_config,
    parameter,
    parse_bool,
)


class TritonPythonModel:
    """The `postprocessing` model: detokenizes each beam."""

    def initialize(self, args: dict[str, Any]) -> None:
        config = load_model_config(args)
        self.tokenizer = configured_tokenizer(config)
        if self.tokenizer is None:
            raise pb_utils.TritonModelException("postprocessing: parameter tokenizer_dir is not set")
        self.skip_special_tokens = parse_bool(parameter(config, "skip_special_tokens"), True)
        self.decoder = ChunkDecoder(self.tokenizer, self.skip_special_tokens)

    def execute(self, requests: list[pb_utils.InferenceRequest]) -> list[pb_utils.InferenceResponse]:
        responses = []
        for request in requests:
            try:  # one bad request gets its own error; the others of the batch still get their text
                responses.append(pb_utils.InferenceResponse(output_tensors=self._process(RequestInputs(request))))
            except Exception as error:
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"postprocessing: {error}")))
        return responses

    def _process(self, request: RequestInputs) -> list[pb_utils.Tensor]:
        received = request.require("TOKENS_BATCH")
        received_lengths = request.require("SEQUENCE_LENGTH")
        # TOKENS_BATCH is [batch, beams, len] ([batch, len] from old clients); SEQUENCE_LENGTH [batch, beams]
        tokens = received[:, np.newaxis, :] if received.ndim == 2 else received
        lengths = received_lengths.reshape(tokens.shape[0], tokens.shape[1])
        texts = []
        for batch_row in range(tokens.shape[0]):
            for beam in range(tokens.shape[1]):
                ids = tokens[batch_row, beam, :int(lengths[batch_row, beam])].tolist()
                texts.append(self.decoder.decode(ids).encode("utf-8"))
        output = np.array(texts, dtype=object).reshape(tokens.shape[0], tokens.shape[1])
        return [pb_utils.Tensor("OUTPUT", output),
                pb_utils.Tensor("OUT_TOKENS_BATCH", received.astype(np.int32)),
                pb_utils.Tensor("OUT_SEQUENCE_LENGTH", received_lengths.astype(np.int32))]

    def finalize(self) -> None:
        self.tokenizer = None
