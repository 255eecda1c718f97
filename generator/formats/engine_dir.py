"""The one reader of an engine dir: limits, world size, backend, dtypes, quantization and vocab.

Both builders write the same `config.json` (docs/DESIGN.md): `{"version", "pretrained_config": <the
checkpoint's config>, "build_config": {max_batch_size, max_input_len, max_seq_len, max_num_tokens,
max_beam_width, plugin_config, ...}}`, plus `"engine_backend": "pytorch"` from gen-repo's pytorch build
(trtllm-build writes none: an engine dir without it is a TensorRT-LLM engine), and one rank file per rank
(`rank{r}.safetensors` for the pytorch engine, `rank{r}.engine` from trtllm-build).

A bare TensorRT-LLM checkpoint dir (no `pretrained_config` key) reads as a pytorch engine with default limits,
so tests and tools can run a checkpoint without building it first; `require_built` refuses it where only a
built engine will do (render).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from generator.errors import ConfigError
from generator.formats.mapping import Mapping
from generator.formats.trtllm_checkpoint import (
    CHECKPOINT_RANK_SUFFIX,
    is_engine_config,
    missing_rank_files,
    rank_files,
    read_config_json,
    read_mapping,
)

ENGINE_BACKENDS = ("pytorch", "tensorrtllm")
TRTLLM_RANK_SUFFIX = ".engine"
# The limits of a checkpoint read without a build_config (the engine's defaults; `gen-repo build` resolves
# its own defaults and writes them, see generator.build).
DEFAULT_MAX_BATCH_SIZE = 8
DEFAULT_MAX_SEQ_LEN = 2048        # trtllm-build's when the checkpoint has no max_position_embeddings
DEFAULT_MAX_INPUT_LEN = 1024
DEFAULT_MIN_NUM_TOKENS = 2048
DEFAULT_TOKENS_PER_BLOCK = 32


@dataclass(frozen=True)
class EngineLimits:
    """The limits of an engine, as `build_config` holds them."""

    max_batch_size: int
    max_input_len: int
    max_seq_len: int
    max_num_tokens: int
    max_beam_width: int


def engine_limits(pretrained: dict[str, Any], build: dict[str, Any]) -> EngineLimits:
    """The limits `build_config` declares, the defaults for those it lacks.

    max_seq_len: declared, else max_input_len + max_output_len (older TensorRT-LLM engines), else the
    checkpoint's max_position_embeddings, else 2048; max_input_len: declared, else min(1024, max_seq_len - 1).
    """
    try:
        max_positions = pretrained.get("max_position_embeddings")
        max_seq_len = int(build.get("max_seq_len") or 0)
        if not max_seq_len and build.get("max_input_len") and build.get("max_output_len"):
            max_seq_len = int(build["max_input_len"]) + int(build["max_output_len"])
        max_seq_len = max_seq_len or int(max_positions or DEFAULT_MAX_SEQ_LEN)
        max_input_len = int(build.get("max_input_len") or min(DEFAULT_MAX_INPUT_LEN, max_seq_len - 1))
        return EngineLimits(
            max_batch_size=int(build.get("max_batch_size") or DEFAULT_MAX_BATCH_SIZE),
            max_input_len=max_input_len,
            max_seq_len=max_seq_len,
            max_num_tokens=int(build.get("max_num_tokens") or max(max_input_len, DEFAULT_MIN_NUM_TOKENS)),
            max_beam_width=int(build.get("max_beam_width") or 1),
        )
    except (TypeError, ValueError) as error:
        raise ConfigError(f"build_config has a malformed limit: {error}") from None


def tokens_per_block(build: dict[str, Any]) -> int:
    """The KV cache block size `build_config` declares (trtllm-build puts it under plugin_config), else 32."""
    plugins = build.get("plugin_config") or {}
    try:
        return int(build.get("tokens_per_block") or plugins.get("tokens_per_block") or DEFAULT_TOKENS_PER_BLOCK)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"build_config has a malformed tokens_per_block: {error}") from None


@dataclass(frozen=True)
class EngineDir:
    """An engine dir (or a bare checkpoint dir) as read from its `config.json`."""

    path: Path
    config: dict[str, Any]           # config.json as written
    pretrained: dict[str, Any]       # the checkpoint config (`pretrained_config`, or the whole bare config)
    build: dict[str, Any]            # `build_config` ({} for a bare checkpoint)
    built: bool                      # False: a bare checkpoint dir
    engine_backend: str              # "pytorch" | "tensorrtllm"
    mapping: Mapping
    limits: EngineLimits
    tokens_per_block: int            # KV cache block size (build_config's, else the engine's default)
    dtype: str                       # the model dtype name (float32 | float16 | bfloat16 for our builds)
    logits_dtype: str
    quant_algo: str | None
    kv_cache_quant_algo: str | None
    vocab_size: int | None
    paged_context_fmha: bool

    @property
    def world_size(self) -> int:
        """tp x pp ranks, one GPU (or process) each."""
        return self.mapping.world_size

    @property
    def max_batch_size(self) -> int:
        return self.limits.max_batch_size

    @property
    def max_input_len(self) -> int:
        return self.limits.max_input_len

    @property
    def max_seq_len(self) -> int:
        return self.limits.max_seq_len

    @property
    def max_num_tokens(self) -> int:
        return self.limits.max_num_tokens

    @property
    def max_beam_width(self) -> int:
        return self.limits.max_beam_width

    @property
    def rank_suffix(self) -> str:
        return CHECKPOINT_RANK_SUFFIX if self.engine_backend == "pytorch" else TRTLLM_RANK_SUFFIX

    def rank_files(self) -> list[Path]:
        """Every rank's file, present or not."""
        return rank_files(self.path, self.world_size, self.rank_suffix)

    def missing_rank_files(self) -> list[str]:
        return missing_rank_files(self.path, self.world_size, self.rank_suffix)

    def require_built(self) -> EngineDir:
        """This engine dir, refusing a bare checkpoint or a `build_config` without its batch and input limits."""
        where = self.path / "config.json"
        if not self.built:
            raise ConfigError(f"{where}: build_config lacks 'max_batch_size' ({self.path} is a TensorRT-LLM "
                              "checkpoint, not an engine dir: run `gen-repo build` first)")
        for key in ("max_batch_size", "max_input_len"):
            if not self.build.get(key):
                raise ConfigError(f"{where}: build_config lacks '{key}'")
        return self


def parse_engine_config(path: Path | str, config: dict[str, Any]) -> EngineDir:
    """An `EngineDir` from the JSON of its `config.json` (an engine's or a bare checkpoint's)."""
    built = is_engine_config(config)
    pretrained = config.get("pretrained_config") if built else config
    build = (config.get("build_config") or {}) if built else {}
    if not isinstance(pretrained, dict) or not isinstance(build, dict):
        raise ConfigError(f"{Path(path) / 'config.json'}: pretrained_config and build_config must be JSON objects")
    backend = str(config.get("engine_backend") or ("tensorrtllm" if built else "pytorch"))
    if backend not in ENGINE_BACKENDS:
        raise ConfigError(f"{Path(path) / 'config.json'}: engine_backend {backend!r} is not one of "
                          f"{', '.join(ENGINE_BACKENDS)}")
    quant = pretrained.get("quantization") or {}
    plugins = build.get("plugin_config") or {}
    vocab = pretrained.get("vocab_size")
    try:
        vocab_size = int(vocab) if vocab is not None else None
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{Path(path) / 'config.json'} has a malformed value: {error}") from None
    return EngineDir(
        path=Path(path), config=config, pretrained=pretrained, build=build, built=built, engine_backend=backend,
        mapping=read_mapping(pretrained), limits=engine_limits(pretrained, build), tokens_per_block=tokens_per_block(build),
        dtype=str(pretrained.get("dtype") or "float32"), logits_dtype=str(pretrained.get("logits_dtype") or "float32"),
        quant_algo=quant.get("quant_algo"), kv_cache_quant_algo=quant.get("kv_cache_quant_algo"),
        vocab_size=vocab_size, paged_context_fmha=bool(plugins.get("use_paged_context_fmha", False)),
    )


def read_engine_dir(path: Path | str) -> EngineDir:
    """Read an engine dir (or a bare checkpoint dir); ConfigError naming the file when it is unreadable."""
    return parse_engine_config(path, read_config_json(path))
