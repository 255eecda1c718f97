"""The TensorRT-LLM engine path: one `trtllm-build` command per checkpoint, run inside NVIDIA's container.

Pinned release: TensorRT-LLM 1.2.1, the version inside `nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3`
(Triton's compatibility matrix maps 26.04-26.07 to 1.2.1). Every flag below was checked against that era's
`tensorrt_llm/commands/build.py` and `tensorrt_llm/plugin/plugin.py`, and against the MPT and DBRX READMEs under
`examples/models/contrib/`:

- plugin flags take a dtype (`float16`, `bfloat16`, `float32`), `auto` or `disable`; gen-repo resolves `auto`
  to the checkpoint's dtype so the command line says what the engine gets, as the READMEs write it;
- `--paged_kv_cache` is only a deprecated alias in 1.x (it logs a warning and sets nothing), so the paged KV
  cache is asked for with `--kv_cache_type paged` (`continuous` otherwise);
- `--strongly_typed` (old DBRX INT8-KV docs) no longer exists: 1.x always builds strongly typed networks;
- weight-only checkpoints (W8A16 / W4A16) need no extra flag: the builder turns on the weight-only matmul plugin
  from the checkpoint's `quant_algo` (unless the checkpoint sets `disable_weight_only_quant_plugin`, which int4
  does not support). `--gemm_plugin` then only serves the layers left in 16 bits (lm_head). MoE layers with
  weight-only weights need the MoE plugin (the plain-TensorRT MoE rejects them). TensorRT-LLM's checkpoint
  loader (`preprocess_weights` -> `weight_only_quantize_dict`) quantizes only weights that are still float and
  takes int8 ones as already in its GPU-specific interleaved layout, so a W8A16/W4A16 checkpoint for it holds
  float weights: what gen-repo's convert writes. A checkpoint holding int8 GEMM weights (gen-repo before 0.2
  wrote a plain, non-interleaved layout, `gen_repo_extensions: plain_weight_only_layout`) is refused here;
- INT8 KV cache (`kv_cache_quant_algo: INT8`) is read from the checkpoint; it needs the GPT attention plugin;
- `--workers N` builds N ranks in parallel, one GPU each; trtllm-build itself caps it at the GPUs present.

The engine dir trtllm-build writes holds `config.json` (`version`, `pretrained_config`, `build_config`) and
`rank{r}.engine` for every rank; `build_with_trtllm` checks exactly that after a build.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from generator.build.settings import BuildSettings, build_config_section, resolve_limits
from generator.convert.models import registered_specs
from generator.errors import ConfigError, GenRepoError
from generator.formats.dtypes import MODEL_DTYPES
from generator.formats.engine_dir import read_engine_dir
from generator.formats.mapping import Mapping
from generator.formats.safetensors import read_safetensors_header
from generator.formats.trtllm_checkpoint import (
    missing_rank_files,
    rank_files,
    read_checkpoint_config,
    read_mapping,
)
from generator.formats.weight_only import is_weight_only_target, weight_only_precision

TRTLLM_VERSION = "1.2.1"
TRITON_CONTAINER_TAG = "26.07"
TRTLLM_CONTAINER = f"nvcr.io/nvidia/tritonserver:{TRITON_CONTAINER_TAG}-trtllm-python-py3"

#: trtllm-build's plugins take a model dtype
PLUGIN_DTYPES = MODEL_DTYPES
# TensorRT-LLM 1.2's QuantAlgo names (tensorrt_llm/quantization/mode.py) and its KV_CACHE_QUANT_ALGO_LIST
TRTLLM_QUANT_ALGOS = (
    "W8A16", "W4A16", "W4A16_AWQ", "W4A8_AWQ", "W8A16_GPTQ", "W4A16_GPTQ", "W8A8_SQ_PER_CHANNEL",
    "W8A8_SQ_PER_TENSOR_PLUGIN", "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN",
    "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN", "W4A8_QSERVE_PER_GROUP", "W4A8_QSERVE_PER_CHANNEL", "FP8",
    "FP8_PER_CHANNEL_PER_TOKEN", "FP8_BLOCK_SCALES", "MIXED_PRECISION", "NVFP4", "W4A8_NVFP4_FP8",
    "W4A8_MXFP4_FP8", "W4A8_MXFP4_MXFP8", "W4A16_MXFP4", "NO_QUANT")
TRTLLM_KV_CACHE_QUANT_ALGOS = ("FP8", "INT8", "NVFP4")


@dataclass(frozen=True)
class CheckpointFacts:
    """What the build needs to know about a TensorRT-LLM checkpoint, read from its config.json."""

    architecture: str
    dtype: str
    mapping: Mapping
    is_moe: bool
    quant_algo: str | None
    kv_cache_quant_algo: str | None
    weight_only_plugin_disabled: bool

    @property
    def world_size(self) -> int:
        return self.mapping.world_size

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> CheckpointFacts:
        """Read a checkpoint's config.json (or an engine's `pretrained_config`) as TensorRT-LLM's
        `PretrainedConfig` does. Deliberately not the pytorch engine's parser: that one refuses what only the
        pytorch engine lacks (e.g. FP8 or AWQ quantization, other activations), which trtllm-build can build."""
        try:
            architecture = str(config["architecture"])
            dtype = str(config["dtype"])
            mapping = read_mapping(config)
            for key in ("hidden_size", "num_attention_heads", "num_hidden_layers"):
                if int(config[key]) < 1:
                    raise ConfigError(f"checkpoint config {key} must be at least 1, got {config[key]}")
        except KeyError as error:
            raise ConfigError(f"checkpoint config lacks the required key {error}") from None
        except (TypeError, ValueError) as error:
            raise ConfigError(f"checkpoint config has a malformed value: {error}") from None
        if dtype not in PLUGIN_DTYPES:
            raise ConfigError(f"checkpoint dtype {dtype!r}: trtllm-build takes {', '.join(PLUGIN_DTYPES)}")
        quant = dict(config.get("quantization") or {})
        if quant.get("quant_algo") not in (None, *TRTLLM_QUANT_ALGOS):
            raise ConfigError(f"quantization.quant_algo {quant['quant_algo']!r} is not a TensorRT-LLM QuantAlgo")
        if quant.get("kv_cache_quant_algo") not in (None, *TRTLLM_KV_CACHE_QUANT_ALGOS):
            raise ConfigError(f"quantization.kv_cache_quant_algo {quant['kv_cache_quant_algo']!r}: TensorRT-LLM "
                              f"takes {', '.join(TRTLLM_KV_CACHE_QUANT_ALGOS)}")
        moe = config.get("moe")
        experts = (moe or {}).get("num_experts") if isinstance(moe, dict) else None
        if experts is None:
            experts = config.get("moe_num_experts")
        return cls(
            architecture=architecture,
            dtype=dtype,
            mapping=mapping,
            is_moe=bool(experts and int(experts) > 0),
            quant_algo=quant.get("quant_algo"),
            kv_cache_quant_algo=quant.get("kv_cache_quant_algo"),
            weight_only_plugin_disabled=bool(config.get("disable_weight_only_quant_plugin", False)),
        )


def check_trtllm_compatible(config: dict[str, Any]) -> CheckpointFacts:
    """Reject checkpoints trtllm-build cannot build (or would build into a different model), naming the
    config field; return their facts.

    The architecture must be registered (`generator.convert.models`), and its spec's `check_trtllm_build` refuses what
    TensorRT-LLM's model of it lacks (e.g. the MPT variants only gen-repo's pytorch engine runs).
    """
    facts = CheckpointFacts.from_config(config)
    specs = registered_specs()
    if facts.architecture not in specs:
        raise ConfigError(f"architecture {facts.architecture!r} cannot be built here "
                          f"(supported: {', '.join(specs)})")
    extensions = list(config.get("gen_repo_extensions") or [])
    if extensions:
        # e.g. plain_weight_only_layout: int8 weights without TensorRT-LLM's GPU-specific interleave, which
        # trtllm-build would not redo (it only quantizes weights that are still float)
        raise ConfigError(f"this checkpoint uses gen-repo extensions TensorRT-LLM cannot build "
                          f"(gen_repo_extensions: {', '.join(map(str, extensions))}); use --engine pytorch")
    specs[facts.architecture].check_trtllm_build(config, facts.mapping)
    if facts.quant_algo == "W4A16" and facts.weight_only_plugin_disabled:
        raise ConfigError("int4 weight-only (W4A16) needs the weight-only plugin, but the checkpoint sets "
                          "disable_weight_only_quant_plugin")
    return facts


def check_float_weight_only(checkpoint_dir: Path, facts: CheckpointFacts) -> None:
    """Refuse a W8A16/W4A16 checkpoint whose GEMM weights are already int8: TensorRT-LLM would take them as
    its interleaved layout unchanged and build an engine that outputs garbage. Reads only the file headers."""
    if weight_only_precision(facts.quant_algo) is None:
        return
    for path in rank_files(checkpoint_dir, facts.world_size):
        if not path.is_file():
            continue  # reported as missing by the caller
        for name, entry in read_safetensors_header(path).items():
            if is_weight_only_target(name) and entry.get("dtype") in ("I8", "U8"):
                raise ConfigError(f"{path.name}: {name} is already quantized ({entry['dtype']}); trtllm-build "
                                  "quantizes weight-only checkpoints itself and would misread it. Convert again "
                                  "(float weights + quant_algo) or use --engine pytorch")


def _checked_plugin(value: str, name: str) -> str:
    if value == "disable" or value in PLUGIN_DTYPES:
        return value
    raise ConfigError(f"{name} {value!r}: use auto, disable or one of {', '.join(PLUGIN_DTYPES)}")


def _enable(flag: bool) -> str:
    return "enable" if flag else "disable"


def trtllm_build_command(settings: BuildSettings, config: dict[str, Any]) -> list[str]:
    """The `trtllm-build` argv for one checkpoint config (see the module docstring for each flag).

    Limits and plugins come from `generator.build.settings`' `build_config` section, the same one the pytorch
    backend writes, so both engine backends get the same max_seq_len / max_num_tokens defaults and the same
    resolution of `auto` plugins to the checkpoint dtype.
    """
    facts = check_trtllm_compatible(config)
    limits = resolve_limits(settings, config)
    section = build_config_section(settings, limits, facts.dtype)
    plugins = section["plugin_config"]
    attention = _checked_plugin(plugins["gpt_attention_plugin"], "gpt_attention_plugin")
    gemm = _checked_plugin(plugins["gemm_plugin"], "gemm_plugin")
    moe = _checked_plugin(plugins["moe_plugin"], "moe_plugin")
    if attention == "disable":
        # the in-flight batching runtime needs it (paged KV cache, packed inputs, INT8 KV cache)
        raise ConfigError("gpt_attention_plugin cannot be disabled: Triton's in-flight batching needs it")
    if facts.is_moe and facts.quant_algo and moe == "disable":
        raise ConfigError(f"{facts.quant_algo} MoE weights need the MoE plugin; do not disable moe_plugin")

    argv = ["trtllm-build",
            "--checkpoint_dir", str(settings.checkpoint_dir),
            "--output_dir", str(settings.output_dir),
            "--gpt_attention_plugin", attention,
            "--gemm_plugin", gemm]
    if facts.is_moe:
        argv += ["--moe_plugin", moe]
    argv += ["--max_batch_size", str(limits.max_batch_size),
             "--max_input_len", str(limits.max_input_len),
             "--max_seq_len", str(limits.max_seq_len),
             "--max_num_tokens", str(limits.max_num_tokens),
             "--max_beam_width", str(limits.max_beam_width),
             "--workers", str(max(1, min(settings.workers, facts.world_size))),
             "--kv_cache_type", str(section["kv_cache_type"]).lower(),
             "--remove_input_padding", _enable(plugins["remove_input_padding"]),
             "--context_fmha", _enable(plugins["context_fmha"])]
    return argv


def trtllm_build_commands(settings: BuildSettings) -> list[list[str]]:
    """The commands that build `settings.checkpoint_dir` into `settings.output_dir`: one trtllm-build.

    Every check runs first, so no command is printed for a checkpoint trtllm-build cannot build correctly.
    """
    checkpoint_dir = Path(settings.checkpoint_dir)
    config = read_checkpoint_config(checkpoint_dir)
    command = trtllm_build_command(settings, config)
    check_float_weight_only(checkpoint_dir, CheckpointFacts.from_config(config))
    return [command]


def check_engine_dir(engine_dir: Path) -> int:
    """Check a trtllm-build output dir (config.json + rank{r}.engine for every rank); return its world size."""
    engine = read_engine_dir(engine_dir)
    if not engine.built or "build_config" not in engine.config:
        raise GenRepoError(f"{engine.path / 'config.json'} is not an engine config (no pretrained_config / "
                           "build_config)")
    world_size = CheckpointFacts.from_config(engine.pretrained).world_size
    missing = missing_rank_files(engine.path, world_size, engine.rank_suffix)
    if missing:
        raise GenRepoError(f"engine dir {engine_dir} lacks {', '.join(missing)} (world size {world_size})")
    return world_size


def build_with_trtllm(settings: BuildSettings) -> Path:
    """Run trtllm-build on the checkpoint; with `dry_run`, print the commands and write nothing.

    Needs TensorRT-LLM (`trtllm-build` on PATH), i.e. NVIDIA's Triton TensorRT-LLM container.
    """
    commands = trtllm_build_commands(settings)
    if settings.dry_run:
        for argv in commands:
            print(shlex.join(argv))
        return Path(settings.output_dir)
    if shutil.which("trtllm-build") is None:
        raise GenRepoError(
            f"trtllm-build is not on PATH: the tensorrtllm engine backend needs TensorRT-LLM {TRTLLM_VERSION}, "
            f"e.g. inside {TRTLLM_CONTAINER} (or use --engine pytorch; --dry-run prints the commands)")
    checkpoint_dir = Path(settings.checkpoint_dir)
    world_size = CheckpointFacts.from_config(read_checkpoint_config(checkpoint_dir)).world_size
    missing = missing_rank_files(checkpoint_dir, world_size)
    if missing:
        raise GenRepoError(f"checkpoint {checkpoint_dir} lacks {', '.join(missing)} (world size {world_size})")
    for argv in commands:
        print(shlex.join(argv), flush=True)
        if subprocess.run(argv, check=False).returncode != 0:
            raise GenRepoError(f"trtllm-build failed (command: {shlex.join(argv)})")
    check_engine_dir(Path(settings.output_dir))
    return Path(settings.output_dir)
