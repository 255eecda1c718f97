"""Render a Triton model repository for an engine dir: preprocessing, tensorrt_llm, postprocessing, ensemble,
tensorrt_llm_bls.

Template version pinned: NVIDIA TensorRT-LLM 1.x `triton_backend/all_models/inflight_batcher_llm`, at the
commits in `ANCHOR_FILES` (the newest stored copies we could read), which extend tensorrtllm_backend c2e65b8
(2025-05-13, the last state of that repo with `all_models/`, = v0.19.0) with optional fields only, so c2e65b8
clients work unchanged. Our templates keep its tensor names, dtypes, dims, optional / reshape /
allow_ragged_batch flags, ensemble maps and, for the C++ `tensorrtllm` backend, every `parameters` key of its
tensorrt_llm template; they drop the duplicated ensemble output `kv_cache_alloc_total_blocks`. Deviations, each
because the upstream form fails on a real server: the ensemble types `prompt_embedding_table` like
tensorrt_llm does (upstream hard-codes FP16), and no ensemble output is also a step's input (see
`ensemble_output_problems`). Values come from the engine's own config.json and
`RenderSettings`, never from hand edits, and every path written is absolute.

Engine backends: `pytorch` (our engine, `generator.engine.Executor` in a decoupled python-backend model) and
`tensorrtllm` (a TensorRT-LLM engine served by NVIDIA's C++ backend).

Several models in one repository: `model_name_prefix` names the five models `<prefix>preprocessing`, ...,
`<prefix>tensorrt_llm_bls` (the ensemble steps and the BLS's model-name parameters follow), and rendering
into a repository only replaces the models it writes. Models with the same tokenizer can share one
preprocessing / postprocessing pair (`shared_pre_post_prefix`): each python model is a stub process of its own
(~250 MB with transformers), so one pair per tokenizer keeps a many-model server small.
"""

from __future__ import annotations

import filecmp
import re
import shutil
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from generator import __version__
from generator.errors import ConfigError, GenRepoError
from generator.formats.dtypes import MODEL_DTYPES, is_model_dtype, triton_type
from generator.formats.engine_dir import ENGINE_BACKENDS, EngineDir, read_engine_dir
from generator.serving import contract, pbtxt

ANCHOR_COMMIT = "c2e65b8"  # tensorrtllm_backend: the older contract every rendered repository still accepts
#: TensorRT-LLM commit of each config.pbtxt the templates were compared with, field by field
#: (triton_backend/all_models/inflight_batcher_llm/<model>/config.pbtxt)
ANCHOR_FILES = {
    "preprocessing": "808059da341493bbf8deb9380aef745e4f546909",
    "postprocessing": "89fd9b74ab7ae753b4c6b3db25a400dca7ea54a0",
    "tensorrt_llm": "2a9abd9536aa62ad3e4b9314be9286b1b1be523b",
    "ensemble": "2a9abd9536aa62ad3e4b9314be9286b1b1be523b",
    "tensorrt_llm_bls": "bff88ea886779f832686acb3f165e2b919c95b77",
}
MODEL_NAMES = tuple(contract.MODELS)  # preprocessing, tensorrt_llm, postprocessing, ensemble, tensorrt_llm_bls
BATCHING_STRATEGIES = ("inflight_fused_batching", "inflight_batching", "V1")
BATCH_SCHEDULER_POLICIES = ("guaranteed_no_evict", "max_utilization")
#: python-backend models and the file of generator/serving/triton_models/ each one runs
PYTHON_MODEL_SOURCES = {
    "preprocessing": "preprocessing.py",
    "postprocessing": "postprocessing.py",
    "tensorrt_llm": "tensorrt_llm.py",
    "tensorrt_llm_bls": "tensorrt_llm_bls.py",
}
#: From this max_input_len on, preprocessing gets a second instance: the longest prompt it still accepts may take
#: seconds to tokenize (max_input_len times the longest token's bytes, ~1 MB/s), and an instance serves one
#: batch at a time, so a second one keeps other requests from waiting behind it.
LONG_INPUT_LEN = 8192
#: characters a model name prefix may use (Triton model names are directory names and URL path segments)
_PREFIX_PATTERN = re.compile(r"[A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class EngineOverrides:
    """Facts the engine dir already holds; `None` takes the engine's (render refuses more than the engine has)."""

    engine_backend: str | None = None         # the engine dir's backend
    triton_max_batch_size: int | None = None   # Triton max_batch_size, at most the engine's max_batch_size
    max_beam_width: int | None = None          # at most the engine's


@dataclass(frozen=True)
class Batching:
    """How Triton queues, batches and spreads requests over model instances (both engine backends)."""

    decoupled: bool = True                     # decoupled tensorrt_llm / BLS: needed for streaming
    max_queue_delay_microseconds: int = 0
    max_queue_size: int = 0                    # 0: unlimited
    cancellation_check_period_ms: int = 100
    preprocessing_instance_count: int | None = None   # None: from the engine's max_input_len (LONG_INPUT_LEN)
    postprocessing_instance_count: int = 1
    bls_instance_count: int = 1


@dataclass(frozen=True)
class TextOptions:
    """Tokenizer behaviour of preprocessing / postprocessing / BLS."""

    exclude_input_in_output: bool = False
    add_special_tokens: bool = True
    skip_special_tokens: bool = True
    trust_remote_code: bool = False
    accumulate_tokens: bool = False            # BLS streams the whole text so far, not deltas


@dataclass(frozen=True)
class RepositoryLayout:
    """Which models a render writes into output_dir, under which names (several models in one repository)."""

    model_name_prefix: str = ""              # models are named "<prefix>preprocessing", ..., "<prefix>ensemble"
    # None: render this model's own preprocessing / postprocessing. A prefix: render neither and use
    # "<shared_pre_post_prefix>preprocessing" / "...postprocessing" already in output_dir (same tokenizer files).
    shared_pre_post_prefix: str | None = None
    overwrite: bool = True                   # replace models of the same names already in output_dir


@dataclass(frozen=True)
class TensorrtllmOptions:
    """Parameters of NVIDIA's C++ `tensorrtllm` backend, named as its config.pbtxt keys; the pytorch engine
    backend ignores them."""

    # scheduler
    batching_strategy: str = "inflight_fused_batching"
    batch_scheduler_policy: str = "guaranteed_no_evict"
    enable_chunked_context: bool = False
    # KV cache
    kv_cache_free_gpu_mem_fraction: float = 0.9
    max_tokens_in_paged_kv_cache: int | None = None
    enable_kv_cache_reuse: bool = False
    kv_cache_host_memory_bytes: int = 0
    kv_cache_onboard_blocks: bool = True
    # devices and kernels
    gpu_device_ids: str | None = None          # None: 0..world size-1
    executor_worker_path: str = "/opt/tritonserver/backends/tensorrtllm/trtllmExecutorWorker"
    normalize_log_probs: bool = True
    decoding_mode: str = ""
    multi_block_mode: bool = True
    enable_context_fmha_fp32_acc: bool = False
    cuda_graph_mode: bool = False
    cuda_graph_cache_size: int = 0
    gpu_weights_percent: float = 1.0
    # statistics
    stats_check_period_ms: int = 100
    iter_stats_max_iterations: int = 1000
    request_stats_max_iterations: int = 0
    # LoRA cache
    lora_cache_optimal_adapter_size: int = 8
    lora_cache_max_adapter_size: int = 64
    lora_cache_gpu_memory_fraction: float = 0.05
    lora_cache_host_memory_bytes: int = 1 << 30


#: RenderSettings' groups: attribute name -> the dataclass of its options
_GROUPS: dict[str, type] = {"engine": EngineOverrides, "batching": Batching, "text": TextOptions,
                            "layout": RepositoryLayout, "tensorrtllm": TensorrtllmOptions}


@dataclass(frozen=True)
class RenderSettings:
    """What `render_repository` needs: three dirs and the options, grouped by concern (each group's fields
    carry the defaults; `gen-repo render`'s flags are those field names)."""

    engine_dir: Path
    tokenizer_dir: Path
    output_dir: Path
    engine: EngineOverrides = EngineOverrides()
    batching: Batching = Batching()
    text: TextOptions = TextOptions()
    layout: RepositoryLayout = RepositoryLayout()
    tensorrtllm: TensorrtllmOptions = TensorrtllmOptions()

    @classmethod
    def from_options(cls, engine_dir: Path, tokenizer_dir: Path, output_dir: Path,
                     **options: Any) -> RenderSettings:
        """Settings from flat option names (the flags' form): each name goes to the group that declares it."""
        grouped: dict[str, dict[str, Any]] = {group: {} for group in _GROUPS}
        for name, value in options.items():
            group = OPTION_GROUP.get(name)
            if group is None:
                raise TypeError(f"RenderSettings has no option {name!r}")
            grouped[group][name] = value
        return cls(engine_dir, tokenizer_dir, output_dir,
                   **{group: _GROUPS[group](**values) for group, values in grouped.items()})


#: flat option name -> the RenderSettings group that declares it (tests check that names are unique)
OPTION_GROUP = {option.name: group for group, kind in _GROUPS.items() for option in fields(kind)}


def engine_info(engine_dir: Path) -> EngineDir:
    """Limits, dtype and world size of a built engine dir (`engine_backend` "tensorrtllm" when not written)."""
    return read_engine_dir(engine_dir).require_built()


def model_names(settings: RenderSettings) -> dict[str, str]:
    """The Triton name of each model of `MODEL_NAMES` (preprocessing / postprocessing possibly shared)."""
    names = {name: settings.layout.model_name_prefix + name for name in MODEL_NAMES}
    if settings.layout.shared_pre_post_prefix is not None:
        for name in ("preprocessing", "postprocessing"):
            names[name] = settings.layout.shared_pre_post_prefix + name
    return names


def rendered_models(settings: RenderSettings) -> tuple[str, ...]:
    """The models of `MODEL_NAMES` this render writes (shared preprocessing / postprocessing are not)."""
    if settings.layout.shared_pre_post_prefix is None:
        return MODEL_NAMES
    return tuple(name for name in MODEL_NAMES if name not in ("preprocessing", "postprocessing"))


def _flag(value: bool) -> str:
    return "true" if value else "false"


def _optional(value: Any) -> str:
    """A parameter the backend may leave at its default: the empty string counts as "not given"."""
    return "" if value is None else str(value)


def preprocessing_instances(settings: RenderSettings, info: EngineDir) -> int:
    """The preprocessing instance count: the setting, else 2 for engines of long inputs (`LONG_INPUT_LEN`)."""
    if settings.batching.preprocessing_instance_count is not None:
        return settings.batching.preprocessing_instance_count
    return 2 if info.max_input_len >= LONG_INPUT_LEN else 1


def template_context(settings: RenderSettings, info: EngineDir) -> dict[str, Any]:
    """Every template variable, from the engine's facts and the settings."""
    batching, text, trt = settings.batching, settings.text, settings.tensorrtllm
    backend = settings.engine.engine_backend or info.engine_backend
    max_batch_size = settings.engine.triton_max_batch_size or info.max_batch_size
    if not is_model_dtype(info.logits_dtype):
        raise ConfigError(f"engine logits_dtype '{info.logits_dtype}' has no Triton type "
                          f"(expected one of {sorted(MODEL_DTYPES)})")
    logits_datatype = triton_type(info.logits_dtype)
    gpu_device_ids = trt.gpu_device_ids or ",".join(str(rank) for rank in range(info.world_size))
    activation_datatype = triton_type(info.dtype, "TYPE_FP16")
    # the engine decides these dtypes of the contract
    types = {contract.LOGITS: logits_datatype, contract.ENCODER: activation_datatype,
             contract.PROMPT: activation_datatype}
    types = {key: value.removeprefix("TYPE_") for key, value in types.items()}
    return {
        "gen_repo_version": __version__,
        "anchor_commit": ANCHOR_COMMIT,
        "anchor_source": (f"TensorRT-LLM triton_backend/all_models/inflight_batcher_llm, per-model commits in "
                          f"generator/serving/render.py ANCHOR_FILES; accepts tensorrtllm_backend {ANCHOR_COMMIT} clients"),
        "model_names": model_names(settings),
        "engine_backend": backend,
        "triton_backend": "tensorrtllm" if backend == "tensorrtllm" else "python",
        "triton_max_batch_size": max_batch_size,
        "decoupled_mode": _flag(batching.decoupled),
        "max_queue_delay_microseconds": batching.max_queue_delay_microseconds,
        "max_queue_size": batching.max_queue_size,
        "engine_dir": str(Path(settings.engine_dir).resolve()),
        "encoder_engine_dir": "",
        "tokenizer_dir": str(Path(settings.tokenizer_dir).resolve()),
        "add_special_tokens": _flag(text.add_special_tokens),
        "skip_special_tokens": _flag(text.skip_special_tokens),
        "trust_remote_code": _flag(text.trust_remote_code),
        "accumulate_tokens": _flag(text.accumulate_tokens),
        "preprocessing_instance_count": preprocessing_instances(settings, info),
        "postprocessing_instance_count": batching.postprocessing_instance_count,
        "bls_instance_count": batching.bls_instance_count,
        "logits_datatype": logits_datatype,
        "encoder_input_features_data_type": activation_datatype,
        # the engine's activation dtype, as TensorRT-LLM's runtime expects prompt tables in it
        "prompt_embedding_table_data_type": activation_datatype,
        # the I/O contract: each model's tensors and the ensemble's routes (generator/serving/contract.py)
        "io": {name: model.for_engine(backend, types) for name, model in contract.MODELS.items()},
        "preprocessing_inputs": contract.PREPROCESSING_INPUTS,
        "preprocessed": contract.PREPROCESSED,
        "core_inputs": contract.core_inputs(backend),
        "passthrough_outputs": contract.PASSTHROUGH_OUTPUTS,
        "exclude_input_in_output": _flag(text.exclude_input_in_output),
        "cancellation_check_period_ms": batching.cancellation_check_period_ms,
        # tensorrtllm parameters, named as the anchor template's variables
        "max_beam_width": settings.engine.max_beam_width or info.max_beam_width,
        "batching_strategy": trt.batching_strategy,
        "max_tokens_in_paged_kv_cache": _optional(trt.max_tokens_in_paged_kv_cache),
        "max_attention_window_size": "",
        "sink_token_length": "",
        "batch_scheduler_policy": trt.batch_scheduler_policy,
        "kv_cache_free_gpu_mem_fraction": trt.kv_cache_free_gpu_mem_fraction,
        "cross_kv_cache_fraction": "",
        "kv_cache_host_memory_bytes": trt.kv_cache_host_memory_bytes,
        "kv_cache_onboard_blocks": _flag(trt.kv_cache_onboard_blocks),
        "stats_check_period_ms": trt.stats_check_period_ms,
        "iter_stats_max_iterations": trt.iter_stats_max_iterations,
        "request_stats_max_iterations": trt.request_stats_max_iterations,
        "enable_kv_cache_reuse": _flag(trt.enable_kv_cache_reuse),
        "normalize_log_probs": _flag(trt.normalize_log_probs),
        "enable_chunked_context": _flag(trt.enable_chunked_context),
        "gpu_device_ids": gpu_device_ids,
        "participant_ids": "",
        "num_nodes": 1,
        "lora_cache_optimal_adapter_size": trt.lora_cache_optimal_adapter_size,
        "lora_cache_max_adapter_size": trt.lora_cache_max_adapter_size,
        "lora_cache_gpu_memory_fraction": trt.lora_cache_gpu_memory_fraction,
        "lora_cache_host_memory_bytes": trt.lora_cache_host_memory_bytes,
        "lora_prefetch_dir": "",
        "decoding_mode": trt.decoding_mode,
        "executor_worker_path": trt.executor_worker_path,
        "lookahead_window_size": "",
        "lookahead_ngram_size": "",
        "lookahead_verification_set_size": "",
        "medusa_choices": "",
        "eagle_choices": "",
        "gpu_weights_percent": trt.gpu_weights_percent,
        "enable_context_fmha_fp32_acc": _flag(trt.enable_context_fmha_fp32_acc),
        "multi_block_mode": _flag(trt.multi_block_mode),
        "cuda_graph_mode": _flag(trt.cuda_graph_mode),
        "cuda_graph_cache_size": trt.cuda_graph_cache_size,
        "speculative_decoding_fast_logits": "false",
        "guided_decoding_backend": "",
        "xgrammar_tokenizer_info_path": "",
    }


def check_settings(settings: RenderSettings, info: EngineDir) -> None:
    """Reject settings the engine or Triton cannot honour, naming the setting."""
    engine, trt = settings.engine, settings.tensorrtllm
    backend = engine.engine_backend or info.engine_backend
    if backend not in ENGINE_BACKENDS:
        raise ConfigError(f"engine_backend '{backend}' is not one of {ENGINE_BACKENDS}")
    if backend != info.engine_backend:
        raise ConfigError(f"engine_backend '{backend}' does not match the engine dir, which holds a "
                          f"'{info.engine_backend}' engine")
    if engine.triton_max_batch_size is not None and not 0 < engine.triton_max_batch_size <= info.max_batch_size:
        raise ConfigError(f"triton_max_batch_size {engine.triton_max_batch_size} must be in 1..{info.max_batch_size} "
                          f"(the engine's max_batch_size)")
    if trt.batching_strategy not in BATCHING_STRATEGIES:
        raise ConfigError(f"batching_strategy '{trt.batching_strategy}' is not one of {BATCHING_STRATEGIES}")
    if trt.batch_scheduler_policy not in BATCH_SCHEDULER_POLICIES:
        raise ConfigError(f"batch_scheduler_policy '{trt.batch_scheduler_policy}' is not one of "
                          f"{BATCH_SCHEDULER_POLICIES}")
    if not 0.0 < trt.kv_cache_free_gpu_mem_fraction <= 1.0:
        raise ConfigError("kv_cache_free_gpu_mem_fraction must be in (0, 1]")
    if engine.max_beam_width is not None and engine.max_beam_width > info.max_beam_width:
        raise ConfigError(f"max_beam_width {engine.max_beam_width} exceeds the engine's {info.max_beam_width}")
    if backend == "pytorch" and (engine.max_beam_width or 1) > 1:
        raise ConfigError("max_beam_width > 1 is not supported by the pytorch engine")
    if trt.enable_kv_cache_reuse and backend == "tensorrtllm" and not info.paged_context_fmha:
        raise ConfigError("enable_kv_cache_reuse needs an engine built with use_paged_context_fmha")
    if backend == "tensorrtllm" and trt.gpu_device_ids is not None:
        count = len(trt.gpu_device_ids.split(";")[0].split(","))
        if count != info.world_size:
            raise ConfigError(f"gpu_device_ids '{trt.gpu_device_ids}' names {count} GPUs per instance but the "
                              f"engine has world size {info.world_size}")
    for name in ("preprocessing_instance_count", "postprocessing_instance_count", "bls_instance_count"):
        if getattr(settings.batching, name) is not None and getattr(settings.batching, name) < 1:
            raise ConfigError(f"{name} must be at least 1")
    if not Path(settings.tokenizer_dir).is_dir():
        raise ConfigError(f"tokenizer dir {settings.tokenizer_dir} does not exist")
    for name in ("model_name_prefix", "shared_pre_post_prefix"):
        prefix = getattr(settings.layout, name)
        if prefix is not None and not _PREFIX_PATTERN.fullmatch(prefix):
            raise ConfigError(f"{name} '{prefix}' may only use letters, digits, '_', '.' and '-'")
    if settings.layout.shared_pre_post_prefix is not None:
        check_shared_pre_post(settings)


def check_shared_pre_post(settings: RenderSettings) -> None:
    """The shared preprocessing / postprocessing exist in the output repository and load the same tokenizer."""
    output = Path(settings.output_dir)
    names = model_names(settings)
    for name in ("preprocessing", "postprocessing"):
        config_file = output / names[name] / "config.pbtxt"
        if not config_file.is_file():
            raise ConfigError(f"shared_pre_post_prefix '{settings.layout.shared_pre_post_prefix}': {config_file} does "
                              f"not exist (render a model with model_name_prefix "
                              f"'{settings.layout.shared_pre_post_prefix}' into {output} first)")
        tokenizer_dir = pbtxt.model_parameter(config_file, "tokenizer_dir")
        if tokenizer_dir is None or not same_tokenizer(Path(tokenizer_dir), Path(settings.tokenizer_dir)):
            raise ConfigError(f"shared_pre_post_prefix '{settings.layout.shared_pre_post_prefix}': {names[name]} "
                              f"loads the tokenizer {tokenizer_dir or '(none)'}, whose files differ from "
                              f"{settings.tokenizer_dir}")


def same_tokenizer(first: Path, second: Path) -> bool:
    """Both dirs hold the same files with the same bytes (tokenizer dirs hold only tokenizer files)."""
    if not (first.is_dir() and second.is_dir()):
        return False
    if first.resolve() == second.resolve():
        return True
    names = sorted(path.name for path in first.iterdir() if path.is_file())
    if names != sorted(path.name for path in second.iterdir() if path.is_file()):
        return False
    _, mismatch, errors = filecmp.cmpfiles(first, second, names, shallow=False)
    return not mismatch and not errors


def templates_dir() -> Path:
    """Where the `*.pbtxt.j2` templates are: the repo's `templates/` (editable) or the wheel's copy."""
    for candidate in (Path(__file__).resolve().parents[2] / "templates",
                      Path(__file__).resolve().parents[1] / "templates"):
        if (candidate / "ensemble.pbtxt.j2").is_file():
            return candidate
    raise GenRepoError("cannot find gen-repo's templates/ directory (broken install?)")


def render_config(model_name: str, context: dict[str, Any]) -> str:
    """The config.pbtxt text of one model."""
    import jinja2

    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(str(templates_dir())),
                                     undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                                     autoescape=False)
    # the top-level texts are what go into quoted string values (paths, parameters); nested data (tensor tables,
    # model names) is pbtxt-safe already
    escaped = {name: pbtxt_escape(value) for name, value in context.items()}
    return environment.get_template(f"{model_name}.pbtxt.j2").render(**escaped)


#: what tritonserver 2.51's python backend leaves alone in a model's path: it starts each stub with
#: `bash -c "exec <stub> <repository>/<model>/1/model.py ..."`, the path unquoted, so a space, a quote, `\` or
#: `$` there splits or rewrites it and the model never loads
_SHELL_UNSAFE = re.compile(r"[^\w@%+=:,./-]")


def check_servable_path(path: Path, what: str) -> None:
    """`GenRepoError` when tritonserver could not load python models from a repository at `path`."""
    unsafe = sorted(set(_SHELL_UNSAFE.findall(str(Path(path).absolute()))))
    if unsafe:
        raise GenRepoError(f"{what} {path} holds {' '.join(f'[{c}]' for c in unsafe)}: tritonserver's python "
                           f"backend starts each model through an unquoted `bash -c` command line and cannot load "
                           f"models from such a path; use letters, digits and . _ - / + = : , @ % only")


def pbtxt_escape(value: Any) -> Any:
    """A text the templates insert, escaped for a protobuf text-format string: a path holding `"` or `\\` (or a
    newline) stays one string value. Names and enum words hold none of these, so escaping is a no-op there."""
    if not isinstance(value, str):
        return value
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")


def render_repository(settings: RenderSettings) -> Path:
    """Write the Triton repository for `settings.engine_dir` into `settings.output_dir`, validate it, return it."""
    from generator.serving.validate import format_problems, validate_repository

    info = engine_info(Path(settings.engine_dir))
    check_settings(settings, info)
    check_servable_path(Path(settings.output_dir), "the repository path")
    context = template_context(settings, info)
    output = Path(settings.output_dir).resolve()
    names = context["model_names"]
    written = rendered_models(settings)
    existing = [names[name] for name in written if (output / names[name]).exists()]
    if existing:
        if not settings.layout.overwrite:
            raise GenRepoError(f"{output} already holds the models {', '.join(existing)} (pass overwrite to "
                               f"replace them)")
        for name in existing:
            shutil.rmtree(output / name)
    source_dir = Path(__file__).resolve().parent / "triton_models"
    for name in written:
        version_dir = output / names[name] / "1"
        version_dir.mkdir(parents=True, exist_ok=True)
        (output / names[name] / "config.pbtxt").write_text(render_config(name, context))
        if name in PYTHON_MODEL_SOURCES and not (name == "tensorrt_llm" and context["triton_backend"] != "python"):
            shutil.copyfile(source_dir / PYTHON_MODEL_SOURCES[name], version_dir / "model.py")
    problems = validate_repository(output, streaming=settings.batching.decoupled)
    if problems:
        raise GenRepoError(f"the rendered repository {output} has problems:\n{format_problems(problems)}")
    return output
