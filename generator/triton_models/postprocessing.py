"""Triton python model `postprocessing`: token ids -> text.

Inputs and outputs as tensorrtllm_backend's inflight_batcher_llm/postprocessing (c2e65b8). Each beam is cut to
its SEQUENCE_LENGTH and decoded without space clean-up (`ChunkDecoder`), so that the chunks of a stream, joined,
equal the text of the whole sequence (tensorrt_llm never splits a multi-byte character across two chunks).
"""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from generator.triton_models.common import (
    ChunkDecoder,
    configured_tokenizer,
    load_model_config,
    parameter,
    parse_bool,
)


class TritonPythonModel:
    """The `postprocessing` model: detokenizes each beam."""

    def initialize(self, args):
        config = load_model_config(args)
        self.tokenizer = configured_tokenizer(config)
        if self.tokenizer is None:
            raise pb_utils.TritonModelException("postprocessing: parameter tokenizer_dir is not set")
        self.skip_special_tokens = parse_bool(parameter(config, "skip_special_tokens"), True)
        self.decoder = ChunkDecoder(self.tokenizer, self.skip_special_tokens)

    def execute(self, requests):
        responses = []
        for request in requests:
            tokens = pb_utils.get_input_tensor_by_name(request, "TOKENS_BATCH").as_numpy()
            lengths = pb_utils.get_input_tensor_by_name(request, "SEQUENCE_LENGTH").as_numpy()
            # TOKENS_BATCH is [batch, beams, len] ([batch, len] from old clients); SEQUENCE_LENGTH [batch, beams]
            if tokens.ndim == 2:
                tokens = tokens[:, np.newaxis, :]
            lengths = lengths.reshape(tokens.shape[0], tokens.shape[1])
            texts = []
            for batch_row in range(tokens.shape[0]):
                for beam in range(tokens.shape[1]):
                    ids = tokens[batch_row, beam, :int(lengths[batch_row, beam])].tolist()
                    texts.append(self.decoder.decode(ids).encode("utf-8"))
            output = np.array(texts, dtype=object).reshape(tokens.shape[0], tokens.shape[1])
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT", output)]))
        return responses

    def finalize(self):
        self.tokenizer = None
