"""The Triton I/O contract of the five models, as data: every tensor's name, dtype, dims and flags, and the
ensemble's routes between the models.

`render` feeds it to the templates (which keep the config.pbtxt layout and loop over these tables), `validate`
checks a repository against it, and the python models take their input lists from it (the BLS its routes, the
pytorch `tensorrt_llm` the inputs it answers with an error, `OutputBuilder` its outputs). It is TensorRT-LLM's
inflight_batcher_llm contract at the commits of `render.ANCHOR_FILES` plus gen-repo's optional extras;
tests/test_render.py keeps its own copy of the anchor's table as the oracle.

Notation of `_t`: flags "r" reshape to a scalar, "g" allow_ragged_batch, "o" optional, "x" declared for anchor
clients but answered with an error by our python model; `note` lines are written above the tensor as comments;
`backend` limits a tensor to one engine backend.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

#: dtypes the engine decides (render resolves them from its config.json)
LOGITS = "LOGITS"
PROMPT = "PROMPT"
ENCODER = "ENCODER"


@dataclass(frozen=True)
class Tensor:
    """One input or output of a model's config.pbtxt."""

    name: str
    data_type: str               # Triton type without TYPE_ ("INT32"), or LOGITS / PROMPT / ENCODER
    dims: tuple[int, ...]
    optional: bool = False
    reshape: bool = False        # reshape: { shape: [ ] } (a [1] input seen as a scalar)
    ragged: bool = False         # allow_ragged_batch
    unsupported: bool = False    # answered with an error by our python model when sent
    note: tuple[str, ...] = ()   # comment lines above it in config.pbtxt
    backend: str | None = None   # only for this engine backend

    @property
    def triton_type(self) -> str:
        """The config.pbtxt data_type ("TYPE_INT32")."""
        return f"TYPE_{self.data_type}"


def _t(name: str, data_type: str, dims: tuple[int, ...], flags: str = "", note: tuple[str, ...] = (),
       backend: str | None = None) -> Tensor:
    return Tensor(name, data_type, dims, optional="o" in flags, reshape="r" in flags, ragged="g" in flags,
                  unsupported="x" in flags, note=note, backend=backend)


@dataclass(frozen=True)
class ModelIO:
    """A model's inputs and outputs, in config.pbtxt order."""

    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]

    def for_engine(self, backend: str, types: dict[str, str]) -> ModelIO:
        """The tensors of one engine backend, with LOGITS / PROMPT / ENCODER replaced by `types`."""
        def resolve(tensors: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
            return tuple(dataclasses.replace(tensor, data_type=types.get(tensor.data_type, tensor.data_type))
                         for tensor in tensors if tensor.backend in (None, backend))
        return ModelIO(resolve(self.inputs), resolve(self.outputs))

    def unsupported_inputs(self) -> tuple[str, ...]:
        """Inputs the python model answers with an error when a client sends them."""
        return tuple(tensor.name for tensor in self.inputs if tensor.unsupported)


PREPROCESSING = ModelIO(inputs=(
    _t("QUERY", "STRING", (1,)),
    _t("DECODER_QUERY", "STRING", (1,), "o"),
    _t("IMAGE_BYTES", "UINT8", (-1, -1, -1, -1), "ox"),
    _t("IMAGE_URL", "STRING", (-1,), "ox"),
    _t("IMAGE_SIZES", "INT64", (-1, 2), "o"),
    _t("VIDEO_BYTES", "UINT8", (-1, -1, -1, -1), "ox"),
    _t("REQUEST_OUTPUT_LEN", "INT32", (1,)),
    _t("BAD_WORDS_DICT", "STRING", (-1,), "o"),
    _t("STOP_WORDS_DICT", "STRING", (-1,), "o"),
    _t("EMBEDDING_BIAS_WORDS", "STRING", (-1,), "o"),
    _t("EMBEDDING_BIAS_WEIGHTS", "FP32", (-1,), "o"),
    _t("END_ID", "INT32", (1,), "o"),
    _t("PAD_ID", "INT32", (1,), "o"),
    _t("PROMPT_TABLE_EXTRA_ID", "UINT64", (1,), "o"),
), outputs=(
    _t("INPUT_ID", "INT32", (-1,)),
    _t("REQUEST_INPUT_LEN", "INT32", (1,)),
    _t("DECODER_INPUT_ID", "INT32", (-1,)),
    _t("REQUEST_DECODER_INPUT_LEN", "INT32", (1,)),
    _t("BAD_WORDS_IDS", "INT32", (2, -1)),
    _t("STOP_WORDS_IDS", "INT32", (2, -1)),
    _t("EMBEDDING_BIAS", "FP32", (-1,)),
    _t("REQUEST_OUTPUT_LEN", "INT32", (-1,)),
    _t("OUT_END_ID", "INT32", (1,)),
    _t("OUT_PAD_ID", "INT32", (1,)),
    _t("OUT_PROMPT_TABLE_EXTRA_IDS", "UINT64", (-1,)),
    _t("PIXEL_VALUES", "FP16", (-1, -1, -1, -1)),
    _t("ASPECT_RATIO_IDS", "INT64", (-1,)),
    _t("ASPECT_RATIO_MASK", "INT64", (-1, -1)),
    _t("CROSS_ATTENTION_MASK", "INT64", (-1, -1, -1)),
    _t("IMAGE_SIZES", "INT64", (-1, 2)),
    _t("IS_VIDEO_INPUT", "BOOL", (1,)),
    _t("ATTENTION_MASK", "INT64", (-1,)),
    _t("IMAGE_GRID_THW", "INT64", (3,)),
    _t("VISION_INPUT_ID", "INT32", (-1,)),
))

TENSORRT_LLM = ModelIO(inputs=(
    _t("input_ids", "INT32", (-1,), "go"),
    _t("encoder_input_features", ENCODER, (-1, -1), "gox"),
    _t("encoder_output_lengths", "INT32", (1,), "rox"),
    _t("input_lengths", "INT32", (1,), "r"),
    _t("request_output_len", "INT32", (1,), "r"),
    _t("num_return_sequences", "INT32", (1,), "ro"),
    _t("draft_input_ids", "INT32", (-1,), "gox"),
    _t("decoder_input_ids", "INT32", (-1,), "go"),
    _t("decoder_input_lengths", "INT32", (1,), "ro"),
    _t("draft_logits", LOGITS, (-1, -1), "gox"),
    _t("draft_acceptance_threshold", "FP32", (1,), "rox"),
    _t("end_id", "INT32", (1,), "ro"),
    _t("pad_id", "INT32", (1,), "ro"),
    _t("stop_words_list", "INT32", (2, -1), "go"),
    _t("bad_words_list", "INT32", (2, -1), "go"),
    _t("embedding_bias", "FP32", (-1,), "go"),
    _t("beam_width", "INT32", (1,), "ro"),
    _t("temperature", "FP32", (1,), "ro"),
    _t("runtime_top_k", "INT32", (1,), "ro"),
    _t("runtime_top_p", "FP32", (1,), "ro"),
    _t("runtime_top_p_min", "FP32", (1,), "ro"),
    _t("runtime_top_p_decay", "FP32", (1,), "ro"),
    _t("runtime_top_p_reset_ids", "INT32", (1,), "ro"),
    _t("len_penalty", "FP32", (1,), "ro"),
    _t("early_stopping", "BOOL", (1,), "ro"),
    _t("repetition_penalty", "FP32", (1,), "ro"),
    _t("min_tokens", "INT32", (1,), "ro"),
    _t("beam_search_diversity_rate", "FP32", (1,), "ro"),
    _t("presence_penalty", "FP32", (1,), "ro"),
    _t("frequency_penalty", "FP32", (1,), "ro"),
    _t("seed", "UINT64", (1,), "ro"),
    _t("random_seed", "UINT64", (1,), "ro", note=('gen-repo extra: the older name of `seed`, so older clients work unchanged (seed wins when both are sent)',), backend="pytorch"),
    _t("return_log_probs", "BOOL", (1,), "ro"),
    _t("return_context_logits", "BOOL", (1,), "ro"),
    _t("return_generation_logits", "BOOL", (1,), "ro"),
    _t("return_perf_metrics", "BOOL", (1,), "ro"),
    _t("return_num_input_tokens", "BOOL", (1,), "ro"),
    _t("return_num_output_tokens", "BOOL", (1,), "ro"),
    _t("exclude_input_in_output", "BOOL", (1,), "ro"),
    _t("stop", "BOOL", (1,), "ro"),
    _t("streaming", "BOOL", (1,), "ro"),
    _t("prompt_embedding_table", PROMPT, (-1, -1), "gox"),
    _t("prompt_table_extra_ids", "UINT64", (-1,), "go"),
    _t("prompt_vocab_size", "INT32", (1,), "rox"),
    _t("cross_attention_mask", "BOOL", (-1, -1), "gox"),
    _t("mrope_rotary_cos_sin", "FP32", (-1,), "ox"),
    _t("mrope_position_deltas", "INT64", (1,), "ox"),
    _t("lora_task_id", "UINT64", (1,), "rox"),
    _t("lora_weights", "FP16", (-1, -1), "gox"),
    _t("lora_config", "INT32", (-1, 3), "gox"),
    _t("context_phase_params", "UINT8", (-1,), "gox"),
    _t("skip_cross_attn_blocks", "BOOL", (1,), "gox"),
    _t("retention_token_range_starts", "INT32", (-1,), "gox"),
    _t("retention_token_range_ends", "INT32", (-1,), "gox"),
    _t("retention_token_range_priorities", "INT32", (-1,), "gox"),
    _t("retention_token_range_durations_ms", "INT32", (-1,), "gox"),
    _t("retention_decode_priority", "INT32", (1,), "gox"),
    _t("retention_decode_duration_ms", "INT32", (1,), "gox"),
    _t("guided_decoding_guide_type", "STRING", (1,), "go"),
    _t("guided_decoding_guide", "STRING", (1,), "go"),
    _t("lookahead_window_size", "INT32", (1,), "gox"),
    _t("lookahead_ngram_size", "INT32", (1,), "gox"),
    _t("lookahead_verification_set_size", "INT32", (1,), "gox"),
), outputs=(
    _t("output_ids", "INT32", (-1, -1)),
    _t("sequence_length", "INT32", (-1,)),
    _t("cum_log_probs", "FP32", (-1,)),
    _t("output_log_probs", "FP32", (-1, -1)),
    _t("context_logits", LOGITS, (-1, -1)),
    _t("generation_logits", LOGITS, (-1, -1, -1)),
    _t("batch_index", "INT32", (1,)),
    _t("sequence_index", "INT32", (1,)),
    _t("context_phase_params", "UINT8", (-1,)),
    _t("kv_cache_alloc_new_blocks", "INT32", (1,)),
    _t("kv_cache_reused_blocks", "INT32", (1,)),
    _t("kv_cache_alloc_total_blocks", "INT32", (1,)),
    _t("arrival_time_ns", "INT64", (1,)),
    _t("first_scheduled_time_ns", "INT64", (1,)),
    _t("first_token_time_ns", "INT64", (1,)),
    _t("last_token_time_ns", "INT64", (1,)),
    _t("acceptance_rate", "FP32", (1,)),
    _t("total_accepted_draft_tokens", "INT32", (1,)),
    _t("total_draft_tokens", "INT32", (1,)),
    _t("num_input_tokens", "INT32", (1,)),
    _t("num_output_tokens", "INT32", (1,)),
))

POSTPROCESSING = ModelIO(inputs=(
    _t("TOKENS_BATCH", "INT32", (-1, -1)),
    _t("SEQUENCE_LENGTH", "INT32", (-1,)),
), outputs=(
    _t("OUTPUT", "STRING", (-1,)),
    _t("OUT_TOKENS_BATCH", "INT32", (-1, -1), note=('gen-repo extras: TOKENS_BATCH / SEQUENCE_LENGTH as received',)),
    _t("OUT_SEQUENCE_LENGTH", "INT32", (-1,)),
))

#: tensorrt_llm outputs that the ensemble and the BLS hand to the client under their own names
PASSTHROUGH_OUTPUTS = (
    "cum_log_probs", "output_log_probs", "context_logits", "generation_logits", "batch_index", "sequence_index",
    "kv_cache_alloc_new_blocks", "kv_cache_reused_blocks", "kv_cache_alloc_total_blocks", "arrival_time_ns",
    "first_scheduled_time_ns", "first_token_time_ns", "last_token_time_ns", "acceptance_rate",
    "total_accepted_draft_tokens", "total_draft_tokens", "num_input_tokens", "num_output_tokens",
)
#: tensorrt_llm outputs the pytorch model adds only when asked (return_num_input_tokens / ...output_tokens)
COUNT_OUTPUTS = ("num_input_tokens", "num_output_tokens")
_CORE_OUTPUTS = {tensor.name: tensor for tensor in TENSORRT_LLM.outputs}
_PASSED = tuple(_CORE_OUTPUTS[name] for name in PASSTHROUGH_OUTPUTS)

ENSEMBLE = ModelIO(inputs=(
    _t("text_input", "STRING", (1,)),
    _t("decoder_text_input", "STRING", (1,), "o"),
    _t("max_tokens", "INT32", (1,)),
    _t("num_return_sequences", "INT32", (1,), "o"),
    _t("bad_words", "STRING", (-1,), "o"),
    _t("stop_words", "STRING", (-1,), "o"),
    _t("exclude_input_in_output", "BOOL", (1,), "o"),
    _t("end_id", "INT32", (1,), "o"),
    _t("pad_id", "INT32", (1,), "o"),
    _t("top_k", "INT32", (1,), "o"),
    _t("top_p", "FP32", (1,), "o"),
    _t("temperature", "FP32", (1,), "o"),
    _t("length_penalty", "FP32", (1,), "o"),
    _t("repetition_penalty", "FP32", (1,), "o"),
    _t("min_tokens", "INT32", (1,), "o"),
    _t("presence_penalty", "FP32", (1,), "o"),
    _t("frequency_penalty", "FP32", (1,), "o"),
    _t("seed", "UINT64", (1,), "o"),
    _t("random_seed", "UINT64", (1,), "o", note=('gen-repo extra: the older name of `seed` (the pytorch tensorrt_llm model takes it)',), backend="pytorch"),
    _t("return_log_probs", "BOOL", (1,), "o"),
    _t("return_context_logits", "BOOL", (1,), "o"),
    _t("return_generation_logits", "BOOL", (1,), "o"),
    _t("return_perf_metrics", "BOOL", (1,), "o"),
    _t("return_num_input_tokens", "BOOL", (1,), "o"),
    _t("return_num_output_tokens", "BOOL", (1,), "o"),
    _t("beam_width", "INT32", (1,), "o"),
    _t("stream", "BOOL", (1,), "o"),
    _t("prompt_embedding_table", PROMPT, (-1, -1), "o", note=("typed like tensorrt_llm's input it feeds (the upstream ensemble hard-codes TYPE_FP16, which only loads when", 'the engine is float16)')),
    _t("prompt_table_extra_id", "UINT64", (1,), "o"),
    _t("prompt_vocab_size", "INT32", (1,), "o"),
    _t("embedding_bias_words", "STRING", (-1,), "o"),
    _t("embedding_bias_weights", "FP32", (-1,), "o"),
    _t("lora_task_id", "UINT64", (1,), "o"),
    _t("lora_weights", "FP16", (-1, -1), "go"),
    _t("lora_config", "INT32", (-1, 3), "go"),
    _t("guided_decoding_guide_type", "STRING", (1,), "go"),
    _t("guided_decoding_guide", "STRING", (1,), "go"),
), outputs=(
    _t("text_output", "STRING", (-1,)),
    _t("output_ids", "INT32", (-1, -1), note=('gen-repo extras: the generated ids and their count, as tensorrt_llm returns them (passed on by postprocessing)',)),
    _t("sequence_length", "INT32", (-1,)),
) + _PASSED)

TENSORRT_LLM_BLS = ModelIO(inputs=(
    _t("text_input", "STRING", (1,)),
    _t("decoder_text_input", "STRING", (1,), "o"),
    _t("image_input", "FP16", (-1, 3, -1, -1), "ox"),
    _t("image_bytes_input", "UINT8", (-1, -1, -1, -1), "ox"),
    _t("image_url_input", "STRING", (1,), "ox"),
    _t("image_sizes_input", "INT64", (-1, 2), "ox"),
    _t("video_bytes_input", "UINT8", (-1, -1, -1, -1), "ox"),
    _t("max_tokens", "INT32", (1,)),
    _t("bad_words", "STRING", (-1,), "o"),
    _t("stop_words", "STRING", (-1,), "o"),
    _t("exclude_input_in_output", "BOOL", (1,), "o"),
    _t("end_id", "INT32", (1,), "o"),
    _t("pad_id", "INT32", (1,), "o"),
    _t("top_k", "INT32", (1,), "o"),
    _t("top_p", "FP32", (1,), "o"),
    _t("temperature", "FP32", (1,), "o"),
    _t("length_penalty", "FP32", (1,), "o"),
    _t("repetition_penalty", "FP32", (1,), "o"),
    _t("min_tokens", "INT32", (1,), "o"),
    _t("presence_penalty", "FP32", (1,), "o"),
    _t("frequency_penalty", "FP32", (1,), "o"),
    _t("seed", "UINT64", (1,), "o"),
    _t("random_seed", "UINT64", (1,), "o", note=('gen-repo extra: the older name of `seed` (seed wins when both are sent)',)),
    _t("return_log_probs", "BOOL", (1,), "ro"),
    _t("return_context_logits", "BOOL", (1,), "ro"),
    _t("return_generation_logits", "BOOL", (1,), "ro"),
    _t("num_return_sequences", "INT32", (1,), "ro"),
    _t("beam_width", "INT32", (1,), "o"),
    _t("stream", "BOOL", (1,), "o"),
    _t("prompt_embedding_table", PROMPT, (-1, -1), "o"),
    _t("prompt_vocab_size", "INT32", (1,), "o"),
    _t("prompt_table_extra_id", "UINT64", (1,), "o"),
    _t("embedding_bias_words", "STRING", (-1,), "o"),
    _t("embedding_bias_weights", "FP32", (-1,), "o"),
    _t("num_draft_tokens", "INT32", (1,), "o"),
    _t("use_draft_logits", "BOOL", (1,), "ro"),
    _t("lora_task_id", "UINT64", (1,), "ro"),
    _t("lora_weights", "FP16", (-1, -1), "go"),
    _t("lora_config", "INT32", (-1, 3), "go"),
    _t("return_perf_metrics", "BOOL", (1,), "ro"),
    _t("return_num_input_tokens", "BOOL", (1,), "ro"),
    _t("return_num_output_tokens", "BOOL", (1,), "ro"),
    _t("guided_decoding_guide_type", "STRING", (1,), "o"),
    _t("guided_decoding_guide", "STRING", (1,), "o"),
), outputs=(
    _t("text_output", "STRING", (-1,)),
) + _PASSED)

MODELS = {"preprocessing": PREPROCESSING, "tensorrt_llm": TENSORRT_LLM, "postprocessing": POSTPROCESSING,
          "ensemble": ENSEMBLE, "tensorrt_llm_bls": TENSORRT_LLM_BLS}

# The routes between the models: the ensemble's input_map / output_map, which the BLS follows by BLS calls.
#: preprocessing input <- client input (ensemble / BLS input)
PREPROCESSING_INPUTS = (
    ("QUERY", "text_input"), ("DECODER_QUERY", "decoder_text_input"), ("REQUEST_OUTPUT_LEN", "max_tokens"),
    ("BAD_WORDS_DICT", "bad_words"), ("STOP_WORDS_DICT", "stop_words"),
    ("EMBEDDING_BIAS_WORDS", "embedding_bias_words"), ("EMBEDDING_BIAS_WEIGHTS", "embedding_bias_weights"),
    ("END_ID", "end_id"), ("PAD_ID", "pad_id"), ("PROMPT_TABLE_EXTRA_ID", "prompt_table_extra_id"),
)
#: preprocessing output -> the ensemble's internal tensor holding it
PREPROCESSED = (
    ("REQUEST_INPUT_LEN", "_REQUEST_INPUT_LEN"), ("INPUT_ID", "_INPUT_ID"),
    ("REQUEST_DECODER_INPUT_LEN", "_REQUEST_DECODER_INPUT_LEN"), ("DECODER_INPUT_ID", "_DECODER_INPUT_ID"),
    ("REQUEST_OUTPUT_LEN", "_REQUEST_OUTPUT_LEN"), ("STOP_WORDS_IDS", "_STOP_WORDS_IDS"),
    ("BAD_WORDS_IDS", "_BAD_WORDS_IDS"), ("EMBEDDING_BIAS", "_EMBEDDING_BIAS"), ("OUT_END_ID", "_PREPROCESSOR_END_ID"),
    ("OUT_PAD_ID", "_PREPROCESSOR_PAD_ID"), ("OUT_PROMPT_TABLE_EXTRA_IDS", "_OUT_PROMPT_TABLE_EXTRA_IDS"),
)


@dataclass(frozen=True)
class Route:
    """A tensorrt_llm input and where it comes from: an internal tensor (`_...`, a preprocessing output) or a
    client input of the same meaning."""

    key: str
    value: str
    backend: str | None = None   # only for this engine backend

    @property
    def preprocessed(self) -> bool:
        return self.value.startswith("_")


#: tensorrt_llm input <- source, in the ensemble's order
CORE_INPUTS = (
    Route("input_ids", "_INPUT_ID"), Route("decoder_input_ids", "_DECODER_INPUT_ID"),
    Route("input_lengths", "_REQUEST_INPUT_LEN"), Route("decoder_input_lengths", "_REQUEST_DECODER_INPUT_LEN"),
    Route("exclude_input_in_output", "exclude_input_in_output"), Route("request_output_len", "_REQUEST_OUTPUT_LEN"),
    Route("end_id", "_PREPROCESSOR_END_ID"), Route("pad_id", "_PREPROCESSOR_PAD_ID"),
    Route("embedding_bias", "_EMBEDDING_BIAS"), Route("runtime_top_k", "top_k"), Route("runtime_top_p", "top_p"),
    Route("temperature", "temperature"), Route("len_penalty", "length_penalty"),
    Route("repetition_penalty", "repetition_penalty"), Route("min_tokens", "min_tokens"),
    Route("presence_penalty", "presence_penalty"), Route("frequency_penalty", "frequency_penalty"),
    Route("seed", "seed"), Route("random_seed", "random_seed", backend="pytorch"),
    Route("return_log_probs", "return_log_probs"), Route("return_context_logits", "return_context_logits"),
    Route("return_generation_logits", "return_generation_logits"),
    Route("return_perf_metrics", "return_perf_metrics"), Route("return_num_input_tokens", "return_num_input_tokens"),
    Route("return_num_output_tokens", "return_num_output_tokens"),
    Route("num_return_sequences", "num_return_sequences"), Route("beam_width", "beam_width"),
    Route("streaming", "stream"), Route("prompt_embedding_table", "prompt_embedding_table"),
    Route("prompt_vocab_size", "prompt_vocab_size"), Route("stop_words_list", "_STOP_WORDS_IDS"),
    Route("bad_words_list", "_BAD_WORDS_IDS"), Route("prompt_table_extra_ids", "_OUT_PROMPT_TABLE_EXTRA_IDS"),
    Route("lora_task_id", "lora_task_id"), Route("lora_weights", "lora_weights"),
    Route("lora_config", "lora_config"), Route("guided_decoding_guide_type", "guided_decoding_guide_type"),
    Route("guided_decoding_guide", "guided_decoding_guide"),
)


def core_inputs(backend: str) -> tuple[Route, ...]:
    """The tensorrt_llm step's input_map for one engine backend."""
    return tuple(route for route in CORE_INPUTS if route.backend in (None, backend))


#: tensorrt_llm inputs only encoder-decoder engines take (the BLS serves decoder-only engines)
ENCODER_DECODER_INPUTS = ("decoder_input_ids", "decoder_input_lengths")


def preprocessed_core_inputs() -> dict[str, str]:
    """Preprocessing output -> the tensorrt_llm input it feeds (decoder-only engines), as the ensemble routes it."""
    feeds = {route.value: route.key for route in CORE_INPUTS if route.preprocessed}
    return {output: feeds[internal] for output, internal in PREPROCESSED
            if internal in feeds and feeds[internal] not in ENCODER_DECODER_INPUTS}


def client_core_inputs() -> dict[str, str]:
    """Client input -> the tensorrt_llm input it is passed to unchanged (inputs of every engine backend)."""
    return {route.value: route.key for route in CORE_INPUTS if not route.preprocessed and route.backend is None}
