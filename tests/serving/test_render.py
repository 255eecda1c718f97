"""render: the rendered repositories keep the I/O contract of the pinned anchor and fill every value.

The ANCHOR_* tables below were read from NVIDIA TensorRT-LLM
`triton_backend/all_models/inflight_batcher_llm/<model>/config.pbtxt` at the commits of `render.ANCHOR_FILES`
(tensor facts only; `LOGITS` / `ENCODER` / `PROMPT` stand for the `${logits_datatype}` /
`${encoder_input_features_data_type}` / `${prompt_embedding_table_data_type}` template variables; the ensemble's
duplicated `kv_cache_alloc_total_blocks` output is listed once). They extend tensorrtllm_backend c2e65b8 with
optional inputs and new outputs only; `C2E65B8_CHANGES` lists what differs, so the older contract is checked too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from generator.cli import main
from generator.errors import ConfigError, GenRepoError
from generator.serving.render import (
    MODEL_NAMES,
    OPTION_GROUP,
    Batching,
    EngineOverrides,
    RenderSettings,
    RepositoryLayout,
    TensorrtllmOptions,
    TextOptions,
    check_servable_path,
    render_repository,
)
from generator.serving.validate import validate_repository

# (name, data type without TYPE_, dims, flags: o = optional, r = reshape to scalar, g = allow_ragged_batch)
ANCHOR_IO = {
    ("preprocessing", "input"): [
        ("QUERY", "STRING", (1,), ""), ("DECODER_QUERY", "STRING", (1,), "o"),
        ("IMAGE_BYTES", "UINT8", (-1, -1, -1, -1), "o"), ("IMAGE_URL", "STRING", (-1,), "o"),
        ("IMAGE_SIZES", "INT64", (-1, 2), "o"), ("VIDEO_BYTES", "UINT8", (-1, -1, -1, -1), "o"), ("REQUEST_OUTPUT_LEN", "INT32", (1,), ""),
        ("BAD_WORDS_DICT", "STRING", (-1,), "o"), ("STOP_WORDS_DICT", "STRING", (-1,), "o"),
        ("EMBEDDING_BIAS_WORDS", "STRING", (-1,), "o"), ("EMBEDDING_BIAS_WEIGHTS", "FP32", (-1,), "o"),
        ("END_ID", "INT32", (1,), "o"), ("PAD_ID", "INT32", (1,), "o"),
        ("PROMPT_TABLE_EXTRA_ID", "UINT64", (1,), "o"),
    ],
    ("preprocessing", "output"): [
        ("INPUT_ID", "INT32", (-1,), ""), ("REQUEST_INPUT_LEN", "INT32", (1,), ""),
        ("DECODER_INPUT_ID", "INT32", (-1,), ""), ("REQUEST_DECODER_INPUT_LEN", "INT32", (1,), ""),
        ("BAD_WORDS_IDS", "INT32", (2, -1), ""), ("STOP_WORDS_IDS", "INT32", (2, -1), ""),
        ("EMBEDDING_BIAS", "FP32", (-1,), ""), ("REQUEST_OUTPUT_LEN", "INT32", (-1,), ""),
        ("OUT_END_ID", "INT32", (1,), ""), ("OUT_PAD_ID", "INT32", (1,), ""),
        ("OUT_PROMPT_TABLE_EXTRA_IDS", "UINT64", (-1,), ""), ("PIXEL_VALUES", "FP16", (-1, -1, -1, -1), ""),
        ("ASPECT_RATIO_IDS", "INT64", (-1,), ""), ("ASPECT_RATIO_MASK", "INT64", (-1, -1), ""),
        ("CROSS_ATTENTION_MASK", "INT64", (-1, -1, -1), ""), ("IMAGE_SIZES", "INT64", (-1, 2), ""),
        ("IS_VIDEO_INPUT", "BOOL", (1,), ""), ("ATTENTION_MASK", "INT64", (-1,), ""),
        ("IMAGE_GRID_THW", "INT64", (3,), ""), ("VISION_INPUT_ID", "INT32", (-1,), ""),
    ],
    ("postprocessing", "input"): [
        ("TOKENS_BATCH", "INT32", (-1, -1), ""), ("SEQUENCE_LENGTH", "INT32", (-1,), ""),
    ],
    ("postprocessing", "output"): [
        ("OUTPUT", "STRING", (-1,), ""),
    ],
    ("tensorrt_llm", "input"): [
        ("input_ids", "INT32", (-1,), "og"), ("encoder_input_features", "ENCODER", (-1, -1), "og"),
        ("encoder_output_lengths", "INT32", (1,), "or"), ("input_lengths", "INT32", (1,), "r"),
        ("request_output_len", "INT32", (1,), "r"), ("num_return_sequences", "INT32", (1,), "or"),
        ("draft_input_ids", "INT32", (-1,), "og"), ("decoder_input_ids", "INT32", (-1,), "og"),
        ("decoder_input_lengths", "INT32", (1,), "or"), ("draft_logits", "LOGITS", (-1, -1), "og"),
        ("draft_acceptance_threshold", "FP32", (1,), "or"), ("end_id", "INT32", (1,), "or"),
        ("pad_id", "INT32", (1,), "or"), ("stop_words_list", "INT32", (2, -1), "og"),
        ("bad_words_list", "INT32", (2, -1), "og"), ("embedding_bias", "FP32", (-1,), "og"),
        ("beam_width", "INT32", (1,), "or"), ("temperature", "FP32", (1,), "or"),
        ("runtime_top_k", "INT32", (1,), "or"), ("runtime_top_p", "FP32", (1,), "or"),
        ("runtime_top_p_min", "FP32", (1,), "or"), ("runtime_top_p_decay", "FP32", (1,), "or"),
        ("runtime_top_p_reset_ids", "INT32", (1,), "or"), ("len_penalty", "FP32", (1,), "or"),
        ("early_stopping", "BOOL", (1,), "or"), ("repetition_penalty", "FP32", (1,), "or"),
        ("min_tokens", "INT32", (1,), "or"), ("beam_search_diversity_rate", "FP32", (1,), "or"),
        ("presence_penalty", "FP32", (1,), "or"), ("frequency_penalty", "FP32", (1,), "or"),
        ("seed", "UINT64", (1,), "or"), ("return_log_probs", "BOOL", (1,), "or"),
        ("return_context_logits", "BOOL", (1,), "or"), ("return_generation_logits", "BOOL", (1,), "or"),
        ("return_perf_metrics", "BOOL", (1,), "or"), ("return_num_input_tokens", "BOOL", (1,), "or"),
        ("return_num_output_tokens", "BOOL", (1,), "or"), ("exclude_input_in_output", "BOOL", (1,), "or"),
        ("stop", "BOOL", (1,), "or"), ("streaming", "BOOL", (1,), "or"),
        ("prompt_embedding_table", "PROMPT", (-1, -1), "og"), ("prompt_table_extra_ids", "UINT64", (-1,), "og"),
        ("prompt_vocab_size", "INT32", (1,), "or"), ("cross_attention_mask", "BOOL", (-1, -1), "og"),
        ("mrope_rotary_cos_sin", "FP32", (-1,), "o"), ("mrope_position_deltas", "INT64", (1,), "o"),
        ("lora_task_id", "UINT64", (1,), "or"), ("lora_weights", "FP16", (-1, -1), "og"),
        ("lora_config", "INT32", (-1, 3), "og"), ("context_phase_params", "UINT8", (-1,), "og"),
        ("skip_cross_attn_blocks", "BOOL", (1,), "og"), ("retention_token_range_starts", "INT32", (-1,), "og"),
        ("retention_token_range_ends", "INT32", (-1,), "og"),
        ("retention_token_range_priorities", "INT32", (-1,), "og"),
        ("retention_token_range_durations_ms", "INT32", (-1,), "og"),
        ("retention_decode_priority", "INT32", (1,), "og"),
        ("retention_decode_duration_ms", "INT32", (1,), "og"),
        ("guided_decoding_guide_type", "STRING", (1,), "og"), ("guided_decoding_guide", "STRING", (1,), "og"),
        ("lookahead_window_size", "INT32", (1,), "og"), ("lookahead_ngram_size", "INT32", (1,), "og"),
        ("lookahead_verification_set_size", "INT32", (1,), "og"),
    ],
    ("tensorrt_llm", "output"): [
        ("output_ids", "INT32", (-1, -1), ""), ("sequence_length", "INT32", (-1,), ""),
        ("cum_log_probs", "FP32", (-1,), ""), ("output_log_probs", "FP32", (-1, -1), ""),
        ("context_logits", "LOGITS", (-1, -1), ""), ("generation_logits", "LOGITS", (-1, -1, -1), ""),
        ("batch_index", "INT32", (1,), ""), ("sequence_index", "INT32", (1,), ""),
        ("context_phase_params", "UINT8", (-1,), ""), ("kv_cache_alloc_new_blocks", "INT32", (1,), ""),
        ("kv_cache_reused_blocks", "INT32", (1,), ""), ("kv_cache_alloc_total_blocks", "INT32", (1,), ""),
        ("arrival_time_ns", "INT64", (1,), ""), ("first_scheduled_time_ns", "INT64", (1,), ""),
        ("first_token_time_ns", "INT64", (1,), ""), ("last_token_time_ns", "INT64", (1,), ""),
        ("acceptance_rate", "FP32", (1,), ""), ("total_accepted_draft_tokens", "INT32", (1,), ""),
        ("total_draft_tokens", "INT32", (1,), ""), ("num_input_tokens", "INT32", (1,), ""),
        ("num_output_tokens", "INT32", (1,), ""),
    ],
    ("ensemble", "input"): [
        ("text_input", "STRING", (1,), ""), ("decoder_text_input", "STRING", (1,), "o"),
        ("max_tokens", "INT32", (1,), ""), ("num_return_sequences", "INT32", (1,), "o"),
        ("bad_words", "STRING", (-1,), "o"), ("stop_words", "STRING", (-1,), "o"),
        ("exclude_input_in_output", "BOOL", (1,), "o"), ("end_id", "INT32", (1,), "o"),
        ("pad_id", "INT32", (1,), "o"), ("top_k", "INT32", (1,), "o"), ("top_p", "FP32", (1,), "o"),
        ("temperature", "FP32", (1,), "o"), ("length_penalty", "FP32", (1,), "o"),
        ("repetition_penalty", "FP32", (1,), "o"), ("min_tokens", "INT32", (1,), "o"),
        ("presence_penalty", "FP32", (1,), "o"), ("frequency_penalty", "FP32", (1,), "o"),
        ("seed", "UINT64", (1,), "o"), ("return_log_probs", "BOOL", (1,), "o"),
        ("return_context_logits", "BOOL", (1,), "o"), ("return_generation_logits", "BOOL", (1,), "o"),
        ("return_perf_metrics", "BOOL", (1,), "o"), ("return_num_input_tokens", "BOOL", (1,), "o"),
        ("return_num_output_tokens", "BOOL", (1,), "o"), ("beam_width", "INT32", (1,), "o"),
        ("stream", "BOOL", (1,), "o"), ("prompt_embedding_table", "PROMPT", (-1, -1), "o"),
        ("prompt_table_extra_id", "UINT64", (1,), "o"), ("prompt_vocab_size", "INT32", (1,), "o"),
        ("embedding_bias_words", "STRING", (-1,), "o"), ("embedding_bias_weights", "FP32", (-1,), "o"),
        ("lora_task_id", "UINT64", (1,), "o"), ("lora_weights", "FP16", (-1, -1), "og"),
        ("lora_config", "INT32", (-1, 3), "og"), ("guided_decoding_guide_type", "STRING", (1,), "og"),
        ("guided_decoding_guide", "STRING", (1,), "og"),
    ],
    ("ensemble", "output"): [
        ("text_output", "STRING", (-1,), ""), ("cum_log_probs", "FP32", (-1,), ""),
        ("output_log_probs", "FP32", (-1, -1), ""), ("context_logits", "LOGITS", (-1, -1), ""),
        ("generation_logits", "LOGITS", (-1, -1, -1), ""), ("batch_index", "INT32", (1,), ""),
        ("sequence_index", "INT32", (1,), ""), ("kv_cache_alloc_new_blocks", "INT32", (1,), ""),
        ("kv_cache_reused_blocks", "INT32", (1,), ""), ("kv_cache_alloc_total_blocks", "INT32", (1,), ""),
        ("arrival_time_ns", "INT64", (1,), ""), ("first_scheduled_time_ns", "INT64", (1,), ""),
        ("first_token_time_ns", "INT64", (1,), ""), ("last_token_time_ns", "INT64", (1,), ""),
        ("acceptance_rate", "FP32", (1,), ""), ("total_accepted_draft_tokens", "INT32", (1,), ""),
        ("total_draft_tokens", "INT32", (1,), ""), ("num_input_tokens", "INT32", (1,), ""),
        ("num_output_tokens", "INT32", (1,), ""),
    ],
    ("tensorrt_llm_bls", "input"): [
        ("text_input", "STRING", (1,), ""), ("decoder_text_input", "STRING", (1,), "o"),
        ("image_input", "FP16", (-1, 3, -1, -1), "o"), ("image_bytes_input", "UINT8", (-1, -1, -1, -1), "o"),
        ("image_url_input", "STRING", (1,), "o"), ("image_sizes_input", "INT64", (-1, 2), "o"),
        ("video_bytes_input", "UINT8", (-1, -1, -1, -1), "o"),
        ("max_tokens", "INT32", (1,), ""), ("bad_words", "STRING", (-1,), "o"),
        ("stop_words", "STRING", (-1,), "o"), ("exclude_input_in_output", "BOOL", (1,), "o"),
        ("end_id", "INT32", (1,), "o"), ("pad_id", "INT32", (1,), "o"), ("top_k", "INT32", (1,), "o"),
        ("top_p", "FP32", (1,), "o"), ("temperature", "FP32", (1,), "o"), ("length_penalty", "FP32", (1,), "o"),
        ("repetition_penalty", "FP32", (1,), "o"), ("min_tokens", "INT32", (1,), "o"),
        ("presence_penalty", "FP32", (1,), "o"), ("frequency_penalty", "FP32", (1,), "o"),
        ("seed", "UINT64", (1,), "o"), ("return_log_probs", "BOOL", (1,), "or"),
        ("return_context_logits", "BOOL", (1,), "or"), ("return_generation_logits", "BOOL", (1,), "or"),
        ("num_return_sequences", "INT32", (1,), "or"), ("beam_width", "INT32", (1,), "o"),
        ("stream", "BOOL", (1,), "o"), ("prompt_embedding_table", "PROMPT", (-1, -1), "o"),
        ("prompt_vocab_size", "INT32", (1,), "o"), ("prompt_table_extra_id", "UINT64", (1,), "o"),
        ("embedding_bias_words", "STRING", (-1,), "o"), ("embedding_bias_weights", "FP32", (-1,), "o"),
        ("num_draft_tokens", "INT32", (1,), "o"), ("use_draft_logits", "BOOL", (1,), "or"),
        ("lora_task_id", "UINT64", (1,), "or"), ("lora_weights", "FP16", (-1, -1), "og"),
        ("lora_config", "INT32", (-1, 3), "og"), ("return_perf_metrics", "BOOL", (1,), "or"),
        ("return_num_input_tokens", "BOOL", (1,), "or"), ("return_num_output_tokens", "BOOL", (1,), "or"),
        ("guided_decoding_guide_type", "STRING", (1,), "o"), ("guided_decoding_guide", "STRING", (1,), "o"),
    ],
    ("tensorrt_llm_bls", "output"): [
        ("text_output", "STRING", (-1,), ""), ("cum_log_probs", "FP32", (-1,), ""),
        ("output_log_probs", "FP32", (-1, -1), ""), ("context_logits", "LOGITS", (-1, -1), ""),
        ("generation_logits", "LOGITS", (-1, -1, -1), ""), ("batch_index", "INT32", (1,), ""),
        ("sequence_index", "INT32", (1,), ""), ("kv_cache_alloc_new_blocks", "INT32", (1,), ""),
        ("kv_cache_reused_blocks", "INT32", (1,), ""), ("kv_cache_alloc_total_blocks", "INT32", (1,), ""),
        ("arrival_time_ns", "INT64", (1,), ""), ("first_scheduled_time_ns", "INT64", (1,), ""),
        ("first_token_time_ns", "INT64", (1,), ""), ("last_token_time_ns", "INT64", (1,), ""),
        ("acceptance_rate", "FP32", (1,), ""), ("total_accepted_draft_tokens", "INT32", (1,), ""),
        ("total_draft_tokens", "INT32", (1,), ""), ("num_input_tokens", "INT32", (1,), ""),
        ("num_output_tokens", "INT32", (1,), ""),
    ],
}

# tensorrt_llm/config.pbtxt: every parameters key (enable_trt_overlap is commented out there, as at c2e65b8)
ANCHOR_TRTLLM_PARAMETERS = (
    "max_beam_width", "FORCE_CPU_ONLY_INPUT_TENSORS", "gpt_model_type", "gpt_model_path", "encoder_model_path",
    "max_tokens_in_paged_kv_cache", "max_attention_window_size", "sink_token_length", "batch_scheduler_policy",
    "kv_cache_free_gpu_mem_fraction", "cross_kv_cache_fraction", "kv_cache_host_memory_bytes",
    "kv_cache_onboard_blocks", "exclude_input_in_output", "cancellation_check_period_ms",
    "stats_check_period_ms", "iter_stats_max_iterations", "request_stats_max_iterations",
    "enable_kv_cache_reuse", "normalize_log_probs", "enable_chunked_context", "gpu_device_ids",
    "participant_ids", "num_nodes", "lora_cache_optimal_adapter_size", "lora_cache_max_adapter_size",
    "lora_cache_gpu_memory_fraction", "lora_cache_host_memory_bytes", "lora_prefetch_dir", "decoding_mode",
    "executor_worker_path", "lookahead_window_size", "lookahead_ngram_size", "lookahead_verification_set_size",
    "medusa_choices", "eagle_choices", "gpu_weights_percent", "enable_context_fmha_fp32_acc",
    "multi_block_mode", "cuda_graph_mode", "cuda_graph_cache_size", "speculative_decoding_fast_logits",
    "tokenizer_dir", "guided_decoding_backend", "xgrammar_tokenizer_info_path",
)

# ensemble/config.pbtxt: (step model, input_map, output_map)
ANCHOR_ENSEMBLE_STEPS = [
    ("preprocessing",
     {'BAD_WORDS_DICT': 'bad_words',
      'DECODER_QUERY': 'decoder_text_input',
      'EMBEDDING_BIAS_WEIGHTS': 'embedding_bias_weights',
      'EMBEDDING_BIAS_WORDS': 'embedding_bias_words',
      'END_ID': 'end_id',
      'PAD_ID': 'pad_id',
      'PROMPT_TABLE_EXTRA_ID': 'prompt_table_extra_id',
      'QUERY': 'text_input',
      'REQUEST_OUTPUT_LEN': 'max_tokens',
      'STOP_WORDS_DICT': 'stop_words'},
     {'BAD_WORDS_IDS': '_BAD_WORDS_IDS',
      'DECODER_INPUT_ID': '_DECODER_INPUT_ID',
      'EMBEDDING_BIAS': '_EMBEDDING_BIAS',
      'INPUT_ID': '_INPUT_ID',
      'OUT_END_ID': '_PREPROCESSOR_END_ID',
      'OUT_PAD_ID': '_PREPROCESSOR_PAD_ID',
      'OUT_PROMPT_TABLE_EXTRA_IDS': '_OUT_PROMPT_TABLE_EXTRA_IDS',
      'REQUEST_DECODER_INPUT_LEN': '_REQUEST_DECODER_INPUT_LEN',
      'REQUEST_INPUT_LEN': '_REQUEST_INPUT_LEN',
      'REQUEST_OUTPUT_LEN': '_REQUEST_OUTPUT_LEN',
      'STOP_WORDS_IDS': '_STOP_WORDS_IDS'}),
    ("tensorrt_llm",
     {'bad_words_list': '_BAD_WORDS_IDS',
      'beam_width': 'beam_width',
      'decoder_input_ids': '_DECODER_INPUT_ID',
      'decoder_input_lengths': '_REQUEST_DECODER_INPUT_LEN',
      'embedding_bias': '_EMBEDDING_BIAS',
      'end_id': '_PREPROCESSOR_END_ID',
      'exclude_input_in_output': 'exclude_input_in_output',
      'frequency_penalty': 'frequency_penalty',
      'guided_decoding_guide': 'guided_decoding_guide',
      'guided_decoding_guide_type': 'guided_decoding_guide_type',
      'input_ids': '_INPUT_ID',
      'input_lengths': '_REQUEST_INPUT_LEN',
      'len_penalty': 'length_penalty',
      'lora_config': 'lora_config',
      'lora_task_id': 'lora_task_id',
      'lora_weights': 'lora_weights',
      'min_tokens': 'min_tokens',
      'num_return_sequences': 'num_return_sequences',
      'pad_id': '_PREPROCESSOR_PAD_ID',
      'presence_penalty': 'presence_penalty',
      'prompt_embedding_table': 'prompt_embedding_table',
      'prompt_table_extra_ids': '_OUT_PROMPT_TABLE_EXTRA_IDS',
      'prompt_vocab_size': 'prompt_vocab_size',
      'repetition_penalty': 'repetition_penalty',
      'request_output_len': '_REQUEST_OUTPUT_LEN',
      'return_context_logits': 'return_context_logits',
      'return_generation_logits': 'return_generation_logits',
      'return_log_probs': 'return_log_probs',
      'return_num_input_tokens': 'return_num_input_tokens',
      'return_num_output_tokens': 'return_num_output_tokens',
      'return_perf_metrics': 'return_perf_metrics',
      'runtime_top_k': 'top_k',
      'runtime_top_p': 'top_p',
      'seed': 'seed',
      'stop_words_list': '_STOP_WORDS_IDS',
      'streaming': 'stream',
      'temperature': 'temperature'},
     {'acceptance_rate': 'acceptance_rate',
      'arrival_time_ns': 'arrival_time_ns',
      'batch_index': 'batch_index',
      'context_logits': 'context_logits',
      'cum_log_probs': 'cum_log_probs',
      'first_scheduled_time_ns': 'first_scheduled_time_ns',
      'first_token_time_ns': 'first_token_time_ns',
      'generation_logits': 'generation_logits',
      'kv_cache_alloc_new_blocks': 'kv_cache_alloc_new_blocks',
      'kv_cache_alloc_total_blocks': 'kv_cache_alloc_total_blocks',
      'kv_cache_reused_blocks': 'kv_cache_reused_blocks',
      'last_token_time_ns': 'last_token_time_ns',
      'num_input_tokens': 'num_input_tokens',
      'num_output_tokens': 'num_output_tokens',
      'output_ids': '_TOKENS_BATCH',
      'output_log_probs': 'output_log_probs',
      'sequence_index': 'sequence_index',
      'sequence_length': '_SEQUENCE_LENGTH',
      'total_accepted_draft_tokens': 'total_accepted_draft_tokens',
      'total_draft_tokens': 'total_draft_tokens'}),
    ("postprocessing",
     {'SEQUENCE_LENGTH': '_SEQUENCE_LENGTH', 'TOKENS_BATCH': '_TOKENS_BATCH'},
     {'OUTPUT': 'text_output'}),
]
#: what tensorrtllm_backend c2e65b8 declared differently: (model, kind, name) -> its facts, None where it lacked
#: the tensor. Every rendered field either equals c2e65b8's or is optional, so c2e65b8 clients work unchanged.
C2E65B8_CHANGES = {
    ("preprocessing", "input", "IMAGE_URL"): ("IMAGE_URL", "STRING", (1,), "o"),
    ("preprocessing", "input", "IMAGE_SIZES"): None,
    ("preprocessing", "output", "IMAGE_SIZES"): ("IMAGE_SIZES", "INT64", (2,), ""),
    ("tensorrt_llm_bls", "input", "image_sizes_input"): None,
    **{(model, "input", name): None for model in ("tensorrt_llm", "ensemble", "tensorrt_llm_bls")
       for name in ("return_num_input_tokens", "return_num_output_tokens")},
    **{(model, "output", name): None for model in ("tensorrt_llm", "ensemble", "tensorrt_llm_bls")
       for name in ("num_input_tokens", "num_output_tokens")},
}
#: models with dynamic_batching: the anchor's, less postprocessing (its batcher queue made tritonserver 2.51 leak
#: every cancelled ensemble stream; see templates/postprocessing.pbtxt.j2)
ANCHOR_DYNAMIC_BATCHING = {"preprocessing", "tensorrt_llm"}


def make_engine_dir(path: Path, engine_backend: str = "pytorch", world_size: int = 1, max_batch_size: int = 8,
                    max_beam_width: int = 1, logits_dtype: str = "float32", dtype: str = "float16") -> Path:
    """An engine dir with the config.json shape both builders write, and empty rank files (render never
    loads weights)."""
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "version": "test",
        "pretrained_config": {"architecture": "MPTForCausalLM", "dtype": dtype, "logits_dtype": logits_dtype,
                              "vocab_size": 512, "mapping": {"world_size": world_size, "tp_size": world_size,
                                                             "pp_size": 1}},
        "build_config": {"max_batch_size": max_batch_size, "max_input_len": 64, "max_seq_len": 128,
                         "max_num_tokens": 512, "max_beam_width": max_beam_width,
                         "plugin_config": {"use_paged_context_fmha": True}},
    }
    if engine_backend == "pytorch":
        config["engine_backend"] = "pytorch"
    (path / "config.json").write_text(json.dumps(config))
    suffix = "safetensors" if engine_backend == "pytorch" else "engine"
    for rank in range(world_size):
        # a whole safetensors file without tensors (validate reads the header of pytorch rank files)
        (path / f"rank{rank}.{suffix}").write_bytes(len(b"{}").to_bytes(8, "little") + b"{}" if suffix == "safetensors"
                                                    else b"")
    return path


def make_tokenizer_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer_config.json").write_text("{}")
    return path


def render(tmp_path: Path, name: str = "repo", engine_backend: str = "pytorch", world_size: int = 1,
           logits_dtype: str = "float32", **settings: object) -> Path:
    engine = make_engine_dir(tmp_path / f"{name}_engine", engine_backend, world_size, logits_dtype=logits_dtype)
    tokenizer = make_tokenizer_dir(tmp_path / "tokenizer")
    return render_repository(RenderSettings.from_options(engine, tokenizer, tmp_path / name, **settings))


def load_config(repo: Path, model: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse((repo / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def tensor_facts(tensor: object, logits_type: str, encoder_type: str,
                 prompt_type: str = "FP16") -> tuple[str, str, tuple[int, ...], str]:
    """(name, dtype, dims, flags) of a parsed tensor, in the ANCHOR_IO notation."""
    name = tensor.name  # type: ignore[attr-defined]
    dtype = model_config_pb2.DataType.Name(tensor.data_type).removeprefix("TYPE_")  # type: ignore[attr-defined]
    if name in ("draft_logits", "context_logits", "generation_logits") and dtype == logits_type:
        dtype = "LOGITS"
    elif name == "encoder_input_features" and dtype == encoder_type:
        dtype = "ENCODER"
    elif name == "prompt_embedding_table" and dtype == prompt_type:
        dtype = "PROMPT"
    flags = "".join(flag for flag, on in (("o", getattr(tensor, "optional", False)),
                                          ("r", tensor.HasField("reshape")),  # type: ignore[attr-defined]
                                          ("g", getattr(tensor, "allow_ragged_batch", False))) if on)
    return (name, dtype, tuple(tensor.dims), flags)  # type: ignore[attr-defined]


@pytest.mark.parametrize("engine_backend", ["pytorch", "tensorrtllm"])
def test_io_matches_anchor(tmp_path: Path, engine_backend: str) -> None:
    repo = render(tmp_path, engine_backend=engine_backend, logits_dtype="float16")
    for (model, kind), expected in ANCHOR_IO.items():
        config = load_config(repo, model)
        tensors = config.input if kind == "input" else config.output
        ours = [tensor_facts(t, "FP16", "FP16") for t in tensors]
        assert len({name for name, *_ in ours}) == len(ours), f"{model} {kind}: a tensor is declared twice"
        ours_by_name = {facts[0]: facts for facts in ours}
        for facts in expected:
            assert ours_by_name.get(facts[0]) == facts, f"{model} {kind} {facts[0]}"
        # anything we add must be optional, so an anchor client never has to send it
        for name, facts in ours_by_name.items():
            if kind == "input" and name not in {f[0] for f in expected}:
                assert "o" in facts[3], f"{model}: extra input {name} must be optional"


def test_c2e65b8_clients_still_fit(tmp_path: Path) -> None:
    """Every input the older tensorrtllm_backend contract declared is still there and takes what it took, and
    every input added since is optional."""
    repo = render(tmp_path, logits_dtype="float16")
    for (model, kind), newest in ANCHOR_IO.items():
        older = [C2E65B8_CHANGES.get((model, kind, facts[0]), facts) for facts in newest]
        tensors = load_config(repo, model).input if kind == "input" else load_config(repo, model).output
        ours = {facts[0]: facts for facts in (tensor_facts(t, "FP16", "FP16") for t in tensors)}
        for facts in older:
            if facts is None:
                continue
            name, dtype, dims, flags = ours[facts[0]]
            assert dtype == facts[1], (model, name)
            if kind == "input":  # (IMAGE_SIZES, the one output that changed shape, is never produced)
                assert "o" in flags or "o" not in facts[3], (model, name)
                # a dim of -1 accepts what a fixed dim took
                assert len(dims) == len(facts[2]), (model, name)
                assert all(d in (-1, old) for d, old in zip(dims, facts[2], strict=True)), (model, name)
        for (changed_model, changed_kind, name), facts in C2E65B8_CHANGES.items():
            if (changed_model, changed_kind) == (model, kind) and facts is None and kind == "input":
                assert "o" in ours[name][3], f"{model}: {name}, new since c2e65b8, must be optional"


@pytest.mark.parametrize(("dtype", "expected"), [("float16", "TYPE_FP16"), ("bfloat16", "TYPE_BF16"),
                                                  ("float32", "TYPE_FP32")])
def test_prompt_embedding_table_follows_engine_dtype(tmp_path: Path, dtype: str, expected: str) -> None:
    engine = make_engine_dir(tmp_path / "engine", dtype=dtype)
    repo = render_repository(RenderSettings(engine_dir=engine, tokenizer_dir=make_tokenizer_dir(tmp_path / "tok"),
                                            output_dir=tmp_path / "repo"))
    for model in ("tensorrt_llm", "ensemble", "tensorrt_llm_bls"):
        inputs = {t.name: t for t in load_config(repo, model).input}
        assert model_config_pb2.DataType.Name(inputs["prompt_embedding_table"].data_type) == expected, model


def test_no_ensemble_output_feeds_a_step(tmp_path: Path) -> None:
    """Triton drops an ensemble output the client did not request; a step fed by it never runs and the request
    ends without its text (issue 8: gRPC clients naming `text_output` got nothing). validate reports it."""
    repo = render(tmp_path)
    ensemble = load_config(repo, "ensemble")
    outputs = {tensor.name for tensor in ensemble.output}
    for step in ensemble.ensemble_scheduling.step:
        assert not outputs & set(step.input_map.values()), step.model_name
    # the layout of the old template: postprocessing fed by the ensemble outputs output_ids / sequence_length
    config_file = repo / "ensemble" / "config.pbtxt"
    text = config_file.read_text()
    for internal, public in (("_TOKENS_BATCH", "output_ids"), ("_SEQUENCE_LENGTH", "sequence_length")):
        text = text.replace(f'value: "{internal}"', f'value: "{public}"')
    text = text.replace('output_map { key: "OUT_TOKENS_BATCH", value: "output_ids" }', "")
    text = text.replace('output_map { key: "OUT_SEQUENCE_LENGTH", value: "sequence_length" }', "")
    config_file.write_text(text)
    problems = [p for p in validate_repository(repo) if "also an ensemble output" in p.message]
    assert {p.field for p in problems} == {"ensemble_scheduling.step[2].input_map[TOKENS_BATCH]",
                                           "ensemble_scheduling.step[2].input_map[SEQUENCE_LENGTH]"}


def test_logits_datatype_follows_engine(tmp_path: Path) -> None:
    for logits_dtype, expected in (("float32", "TYPE_FP32"), ("float16", "TYPE_FP16")):
        repo = render(tmp_path, name=f"repo_{logits_dtype}", logits_dtype=logits_dtype)
        for model in ("tensorrt_llm", "ensemble", "tensorrt_llm_bls"):
            outputs = {t.name: t for t in load_config(repo, model).output}
            assert model_config_pb2.DataType.Name(outputs["generation_logits"].data_type) == expected


@pytest.mark.parametrize("engine_backend", ["pytorch", "tensorrtllm"])
def test_ensemble_maps_match_anchor(tmp_path: Path, engine_backend: str) -> None:
    repo = render(tmp_path, engine_backend=engine_backend)
    steps = load_config(repo, "ensemble").ensemble_scheduling.step
    ours = [(step.model_name, dict(step.input_map), dict(step.output_map)) for step in steps]
    # our extras: the pytorch model also takes `seed` under its older name `random_seed`; and postprocessing
    # hands the token ids back as the ensemble's `output_ids` / `sequence_length` (never the internal
    # `_TOKENS_BATCH` / `_SEQUENCE_LENGTH` themselves: see test_no_ensemble_output_feeds_a_step)
    assert ours[1][1].pop("random_seed", None) == ("random_seed" if engine_backend == "pytorch" else None)
    assert ours[2][2].pop("OUT_TOKENS_BATCH") == "output_ids"
    assert ours[2][2].pop("OUT_SEQUENCE_LENGTH") == "sequence_length"
    assert ours == ANCHOR_ENSEMBLE_STEPS
    outputs = {tensor.name for tensor in load_config(repo, "ensemble").output}
    assert {"output_ids", "sequence_length"} <= outputs


def test_tensorrtllm_has_every_anchor_parameter(tmp_path: Path) -> None:
    engine_dir = make_engine_dir(tmp_path / "engine", "tensorrtllm", world_size=2, max_batch_size=16,
                                 max_beam_width=2)
    repo = render_repository(RenderSettings.from_options(
        engine_dir, make_tokenizer_dir(tmp_path / "tok"), tmp_path / "repo", max_tokens_in_paged_kv_cache=2560,
        kv_cache_free_gpu_mem_fraction=0.5, enable_kv_cache_reuse=True))
    text = (repo / "tensorrt_llm" / "config.pbtxt").read_text()
    assert "${" not in text and "{{" not in text
    config = load_config(repo, "tensorrt_llm")
    assert config.backend == "tensorrtllm"
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    missing = [key for key in ANCHOR_TRTLLM_PARAMETERS if key not in parameters]
    assert missing == []
    assert len(ANCHOR_TRTLLM_PARAMETERS) == 45
    # values come from the engine's config.json and the settings
    assert parameters["gpt_model_path"] == str(engine_dir.resolve())
    assert parameters["gpt_model_type"] == "inflight_fused_batching"
    assert parameters["gpu_device_ids"] == "0,1"
    assert parameters["max_beam_width"] == "2"
    assert parameters["max_tokens_in_paged_kv_cache"] == "2560"
    assert parameters["kv_cache_free_gpu_mem_fraction"] == "0.5"
    assert parameters["enable_kv_cache_reuse"] == "true"
    assert parameters["FORCE_CPU_ONLY_INPUT_TENSORS"] == "no"
    assert parameters["tokenizer_dir"] == str((tmp_path / "tok").resolve())
    assert config.max_batch_size == 16
    assert config.model_transaction_policy.decoupled
    assert not (repo / "tensorrt_llm" / "1" / "model.py").exists()


def test_pytorch_repository_layout(tmp_path: Path) -> None:
    repo = render(tmp_path, preprocessing_instance_count=2, postprocessing_instance_count=3, bls_instance_count=4,
                  max_queue_delay_microseconds=100, max_queue_size=7, add_special_tokens=False,
                  skip_special_tokens=False, accumulate_tokens=True, exclude_input_in_output=True)
    assert sorted(p.name for p in repo.iterdir()) == sorted(MODEL_NAMES)
    configs = {model: load_config(repo, model) for model in MODEL_NAMES}
    core = configs["tensorrt_llm"]
    assert core.backend == "python" and core.model_transaction_policy.decoupled
    assert [(g.count, g.kind) for g in core.instance_group] == [(1, model_config_pb2.ModelInstanceGroup.KIND_CPU)]
    assert core.parameters["gpt_model_path"].string_value == str((tmp_path / "repo_engine").resolve())
    assert core.parameters["exclude_input_in_output"].string_value == "true"
    assert configs["tensorrt_llm_bls"].model_transaction_policy.decoupled
    assert configs["tensorrt_llm_bls"].parameters["accumulate_tokens"].string_value == "true"
    assert configs["preprocessing"].parameters["add_special_tokens"].string_value == "false"
    assert configs["postprocessing"].parameters["skip_special_tokens"].string_value == "false"
    assert [g.count for g in configs["preprocessing"].instance_group] == [2]
    assert [g.count for g in configs["postprocessing"].instance_group] == [3]
    assert [g.count for g in configs["tensorrt_llm_bls"].instance_group] == [4]
    for model, config in configs.items():
        assert config.max_batch_size == 8, model  # the engine's
        assert config.HasField("dynamic_batching") == (model in ANCHOR_DYNAMIC_BATCHING), model
    assert core.dynamic_batching.max_queue_delay_microseconds == 100
    assert core.dynamic_batching.default_queue_policy.max_queue_size == 7
    for model in ("preprocessing", "postprocessing", "tensorrt_llm", "tensorrt_llm_bls"):
        source = (repo / model / "1" / "model.py").read_text()
        assert "class TritonPythonModel" in source
    assert (repo / "ensemble" / "1").is_dir() and not any((repo / "ensemble" / "1").iterdir())
    for model in ("preprocessing", "postprocessing"):
        assert Path(configs[model].parameters["tokenizer_dir"].string_value).is_absolute()


def test_max_batch_size_override_and_limits(tmp_path: Path) -> None:
    repo = render(tmp_path, triton_max_batch_size=4)
    assert {load_config(repo, m).max_batch_size for m in MODEL_NAMES} == {4}
    with pytest.raises(ConfigError, match="max_batch_size"):
        render(tmp_path, name="too_big", triton_max_batch_size=9)


def test_settings_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not match the engine dir"):
        render_repository(RenderSettings(engine_dir=make_engine_dir(tmp_path / "e", "pytorch"),
                                         tokenizer_dir=make_tokenizer_dir(tmp_path / "t"),
                                         output_dir=tmp_path / "a", engine=EngineOverrides("tensorrtllm")))
    with pytest.raises(ConfigError, match="batching_strategy"):
        render(tmp_path, name="b", engine_backend="tensorrtllm", batching_strategy="static")
    with pytest.raises(ConfigError, match="gpu_device_ids"):
        render(tmp_path, name="c", engine_backend="tensorrtllm", world_size=2, gpu_device_ids="0")
    with pytest.raises(ConfigError, match="beam"):
        render(tmp_path, name="d", max_beam_width=2)


def test_non_decoupled_render_validates(tmp_path: Path) -> None:
    repo = render(tmp_path, decoupled=False)
    assert not load_config(repo, "tensorrt_llm").model_transaction_policy.decoupled
    assert validate_repository(repo, streaming=False) == []
    assert any("decoupled" in p.field for p in validate_repository(repo, streaming=True))


def test_cli_render_then_validate(tmp_path: Path) -> None:
    engine = make_engine_dir(tmp_path / "engine")
    tokenizer = make_tokenizer_dir(tmp_path / "tok")
    runner = CliRunner()
    result = runner.invoke(main, ["render", "--engine-dir", str(engine), "--tokenizer-dir", str(tokenizer),
                                  "--output", str(tmp_path / "repo"), "--max-batch-size", "2"])
    assert result.exit_code == 0, result.output
    assert load_config(tmp_path / "repo", "ensemble").max_batch_size == 2
    result = runner.invoke(main, ["validate", str(tmp_path / "repo")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["render", "--engine-dir", str(engine), "--tokenizer-dir", str(tokenizer),
                                  "--output", str(tmp_path / "repo2"), "--max-batch-size", "99"])
    assert result.exit_code == 2 and "max_batch_size" in result.output


def test_model_name_prefix_names_every_model_and_reference(tmp_path: Path) -> None:
    repo = render(tmp_path, model_name_prefix="mpt_a.")
    names = [f"mpt_a.{model}" for model in MODEL_NAMES]
    assert sorted(p.name for p in repo.iterdir()) == sorted(names)
    for model in MODEL_NAMES:
        assert load_config(repo, f"mpt_a.{model}").name == f"mpt_a.{model}"
    steps = load_config(repo, "mpt_a.ensemble").ensemble_scheduling.step
    assert [step.model_name for step in steps] == ["mpt_a.preprocessing", "mpt_a.tensorrt_llm", "mpt_a.postprocessing"]
    bls = load_config(repo, "mpt_a.tensorrt_llm_bls").parameters
    assert {key: bls[key].string_value for key in ("tensorrt_llm_model_name", "preprocessing_model_name",
                                                   "postprocessing_model_name")} == {
        "tensorrt_llm_model_name": "mpt_a.tensorrt_llm", "preprocessing_model_name": "mpt_a.preprocessing",
        "postprocessing_model_name": "mpt_a.postprocessing"}
    # the default stays unprefixed
    plain = render(tmp_path, name="plain")
    assert load_config(plain, "tensorrt_llm_bls").parameters["tensorrt_llm_model_name"].string_value == "tensorrt_llm"
    assert [s.model_name for s in load_config(plain, "ensemble").ensemble_scheduling.step] == [
        "preprocessing", "tensorrt_llm", "postprocessing"]


def test_several_models_in_one_repository_with_shared_pre_post(tmp_path: Path) -> None:
    tokenizer = make_tokenizer_dir(tmp_path / "tokenizer")
    repo = tmp_path / "repo"

    def add(prefix: str, shared: str | None = None, **settings: object) -> Path:
        engine = make_engine_dir(tmp_path / f"engine_{prefix}")
        return render_repository(RenderSettings.from_options(engine, tokenizer, repo, model_name_prefix=prefix,
                                                             shared_pre_post_prefix=shared, **settings))

    add("a_")
    add("b_", shared="a_")
    add("c_")
    expected = {f"{p}{m}" for p in ("a_", "c_") for m in MODEL_NAMES}
    expected |= {f"b_{m}" for m in ("tensorrt_llm", "ensemble", "tensorrt_llm_bls")}
    assert {p.name for p in repo.iterdir()} == expected
    steps = load_config(repo, "b_ensemble").ensemble_scheduling.step
    assert [step.model_name for step in steps] == ["a_preprocessing", "b_tensorrt_llm", "a_postprocessing"]
    bls = load_config(repo, "b_tensorrt_llm_bls").parameters
    assert bls["preprocessing_model_name"].string_value == "a_preprocessing"
    assert validate_repository(repo) == []
    # re-rendering one model replaces only its own models
    before = (repo / "c_tensorrt_llm" / "config.pbtxt").stat().st_mtime_ns
    add("a_", bls_instance_count=2)
    assert [g.count for g in load_config(repo, "a_tensorrt_llm_bls").instance_group] == [2]
    assert (repo / "c_tensorrt_llm" / "config.pbtxt").stat().st_mtime_ns == before
    # ... unless told not to
    with pytest.raises(GenRepoError, match="already holds the models c_preprocessing"):
        add("c_", overwrite=False)
    # the whole repository is validated: b_'s ensemble (max_batch_size 8) cannot use a shared pair of 4
    with pytest.raises(GenRepoError, match="b_ensemble/config.pbtxt: max_batch_size: 8 exceeds step model "
                                           "'a_preprocessing'"):
        add("a_", triton_max_batch_size=4)


def test_shared_pre_post_must_exist_with_the_same_tokenizer(tmp_path: Path) -> None:
    engine = make_engine_dir(tmp_path / "engine")
    repo = tmp_path / "repo"

    def render_into_repo(tokenizer: Path, prefix: str, shared: str | None = None) -> Path:
        return render_repository(RenderSettings(engine_dir=engine, tokenizer_dir=tokenizer, output_dir=repo,
                                                layout=RepositoryLayout(prefix, shared)))

    with pytest.raises(ConfigError, match="a_preprocessing/config.pbtxt does not exist"):
        render_into_repo(make_tokenizer_dir(tmp_path / "t1"), "b_", "a_")
    render_into_repo(tmp_path / "t1", "a_")
    same = make_tokenizer_dir(tmp_path / "t2")  # a copy with the same bytes is the same tokenizer
    render_into_repo(same, "b_", "a_")
    other = make_tokenizer_dir(tmp_path / "t3")
    (other / "tokenizer_config.json").write_text('{"model_max_length": 7}')
    with pytest.raises(ConfigError, match="whose files differ"):
        render_into_repo(other, "c_", "a_")
    with pytest.raises(ConfigError, match="model_name_prefix 'a/b'"):
        render_into_repo(same, "a/b")


def test_render_options_have_one_group_each(tmp_path: Path) -> None:
    """Each flat option name (as `gen-repo render`'s flags use) is declared by exactly one RenderSettings group."""
    from dataclasses import fields

    from generator.cli import main

    declared = [field.name for group in (EngineOverrides, Batching, TextOptions, RepositoryLayout, TensorrtllmOptions)
                for field in fields(group)]
    assert sorted(declared) == sorted(OPTION_GROUP)
    flags = {param.name for param in main.commands["render"].params} - {"engine_dir", "tokenizer_dir", "output_dir"}
    assert flags <= set(OPTION_GROUP)
    settings = RenderSettings.from_options(tmp_path, tmp_path, tmp_path, bls_instance_count=2,
                                           model_name_prefix="p_", gpu_device_ids="0")
    assert (settings.batching.bls_instance_count, settings.layout.model_name_prefix,
            settings.tensorrtllm.gpu_device_ids) == (2, "p_", "0")
    with pytest.raises(TypeError, match="no option 'max_batch_size'"):
        RenderSettings.from_options(tmp_path, tmp_path, tmp_path, max_batch_size=1)


def test_validate_reports_a_bls_pointing_at_another_group(tmp_path: Path) -> None:
    repo = render(tmp_path, model_name_prefix="x_")
    config = repo / "x_tensorrt_llm_bls" / "config.pbtxt"
    config.write_text(config.read_text().replace('string_value: "x_tensorrt_llm"', 'string_value: "tensorrt_llm"'))
    problems = validate_repository(repo)
    assert [(p.field, "x_tensorrt_llm" in p.message) for p in problems] == [
        ("parameters[tensorrt_llm_model_name]", True)]


def test_cli_render_with_prefix(tmp_path: Path) -> None:
    engine = make_engine_dir(tmp_path / "engine")
    tokenizer = make_tokenizer_dir(tmp_path / "tok")
    runner = CliRunner()
    for prefix, shared in (("one_", []), ("two_", ["--shared-pre-post-prefix", "one_"])):
        result = runner.invoke(main, ["render", "--engine-dir", str(engine), "--tokenizer-dir", str(tokenizer),
                                      "--output", str(tmp_path / "repo"), "--model-name-prefix", prefix, *shared])
        assert result.exit_code == 0, result.output
    assert load_config(tmp_path / "repo", "two_ensemble").ensemble_scheduling.step[0].model_name == "one_preprocessing"
    result = runner.invoke(main, ["validate", str(tmp_path / "repo")])
    assert result.exit_code == 0, result.output


# --- the rendered pytorch repository, served by the session tritonserver (tests/conftest.py) -------------------

def _generate(server: object, model: str, body: dict[str, object]) -> dict[str, object]:
    """POST /v2/models/<model>/generate; returns the JSON body (Triton answers errors in the body too)."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"http://{server.http_url}/v2/models/{model}/generate",  # type: ignore[attr-defined]
                                     data=json.dumps(body).encode(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return dict(json.loads(response.read()))
    except urllib.error.HTTPError as error:
        return dict(json.loads(error.read()))


@pytest.mark.server
@pytest.mark.parametrize("model", ["ensemble", "tensorrt_llm_bls"])
def test_served_outputs_and_unsupported_inputs(triton_server: object, model: str) -> None:
    base = {"text_input": "def hello", "max_tokens": 6, "exclude_input_in_output": True}
    # the token counts come only when asked for, as from TensorRT-LLM's backend
    answer = _generate(triton_server, model, {**base, "return_num_input_tokens": True,
                                              "return_num_output_tokens": True})
    anchor_outputs = {name for name, *_ in ANCHOR_IO[(model, "output")]}
    assert anchor_outputs <= set(answer), anchor_outputs - set(answer)
    assert isinstance(answer["text_output"], str) and answer["text_output"]
    for extra, what in (({"beam_width": 2}, "beam search"), ({"return_context_logits": True}, "return_context_logits"),
                        ({"lora_task_id": 3}, "lora_task_id"), ({"num_return_sequences": 2}, "num_return_sequences")):
        error = _generate(triton_server, model, {**base, **extra}).get("error", "")
        assert what in str(error) and "not supported by the pytorch engine" in str(error), error
    # the older input name of `seed` samples exactly like `seed`
    sampled = {**base, "top_k": 40, "temperature": 1.5}
    assert (_generate(triton_server, model, {**sampled, "random_seed": 7})["text_output"]
            == _generate(triton_server, model, {**sampled, "seed": 7})["text_output"])
    assert _generate(triton_server, model, base)["text_output"] == answer["text_output"]


@pytest.mark.server
def test_served_batch_and_cancellation(triton_server: object) -> None:
    import queue

    import numpy as np
    import tritonclient.grpc as grpcclient

    def tensor(name: str, array: np.ndarray) -> grpcclient.InferInput:
        from tritonclient.utils import np_to_triton_dtype

        item = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        item.set_data_from_numpy(array)
        return item

    def stream(prompts: list[str], max_tokens: int, cancel_after: int | None = None) -> list[tuple[int, str]]:
        results: queue.Queue[tuple[object, object]] = queue.Queue()
        client = grpcclient.InferenceServerClient(triton_server.grpc_url)  # type: ignore[attr-defined]
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        client.async_stream_infer("ensemble", [
            tensor("text_input", np.array([[p.encode()] for p in prompts], dtype=np.object_)),
            tensor("max_tokens", np.full((len(prompts), 1), max_tokens, dtype=np.int32)),
            tensor("stream", np.ones((len(prompts), 1), dtype=bool)),
            tensor("exclude_input_in_output", np.ones((len(prompts), 1), dtype=bool))],
            enable_empty_final_response=True)
        pieces: list[tuple[int, str]] = []
        while True:
            result, error = results.get(timeout=120)
            assert error is None, error
            text = result.as_numpy("text_output")  # type: ignore[attr-defined]
            if text is not None:
                row = int(result.as_numpy("batch_index").reshape(-1)[0])  # type: ignore[attr-defined]
                pieces.append((row, text.reshape(-1)[0].decode()))
            if cancel_after is not None and len(pieces) >= cancel_after:
                client.stop_stream(cancel_requests=True)
                return pieces
            if result.get_response().parameters["triton_final_response"].bool_param:  # type: ignore[attr-defined]
                client.stop_stream()
                return pieces

    prompts = ["def hello", "import numpy"]
    batched = stream(prompts, 5)
    for row, prompt in enumerate(prompts):
        alone = "".join(text for _, text in stream([prompt], 5))
        assert "".join(text for r, text in batched if r == row) == alone
    assert len(stream(["def hello"], 100, cancel_after=2)) == 2
    # the cancelled request left the single tensorrt_llm instance free: the next one is served at once
    assert "".join(text for _, text in stream(["def hello"], 3))


def test_paths_with_quotes_are_escaped_and_unservable_repository_paths_refused(tmp_path: Path) -> None:
    """Issue 10 item 8: a path holding `"` or `\\` went into config.pbtxt unescaped (the repository did not parse).
    Engine and tokenizer paths are now escaped; a repository path tritonserver's python backend cannot start
    models from (it runs `bash -c` with the path unquoted) is refused in one line before anything is written."""
    odd = tmp_path / 'odd "dir" \\ x'
    odd.mkdir()
    engine = make_engine_dir(odd / "engine")
    tokenizer = make_tokenizer_dir(odd / "tokenizer")
    repo = render_repository(RenderSettings(engine_dir=engine, tokenizer_dir=tokenizer, output_dir=tmp_path / "repo"))
    assert load_config(repo, "preprocessing").parameters["tokenizer_dir"].string_value == str(tokenizer.resolve())
    assert load_config(repo, "tensorrt_llm").parameters["gpt_model_path"].string_value == str(engine.resolve())
    for name in ('we"ird', "a b", "back\\slash", "cost$1", "semi;colon"):
        with pytest.raises(GenRepoError, match=r"unquoted `bash -c`"):
            render_repository(RenderSettings(engine_dir=engine, tokenizer_dir=tokenizer, output_dir=tmp_path / name))
        assert not (tmp_path / name).exists()
    check_servable_path(tmp_path / "fine-dir_1.2/x+y=z@a,b:c%d", "x")
