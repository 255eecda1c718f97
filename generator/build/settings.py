"""What every engine backend shares: `BuildSettings`, the resolved limits, the `build_config` section and the
checks on the checkpoint dir (the pytorch and trtllm-build paths both import these, never each other)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from generator.errors import ConfigError
from generator.formats.engine_dir import DEFAULT_MAX_INPUT_LEN, DEFAULT_MAX_SEQ_LEN, EngineLimits

DEFAULT_MAX_NUM_TOKENS = 8192  # trtllm-build's default


@dataclass(frozen=True)
class BuildSettings:
    """Inputs of `build_engine`; limits are per engine, as trtllm-build takes them.

    `max_seq_len` None: the checkpoint's max_position_embeddings (2048 when unset, as trtllm-build does).
    `max_input_len` None: min(1024, max_seq_len / 2), the whole job's rule, so defaults fit any checkpoint.
    `max_num_tokens` None: min(8192, max_batch_size x max_input_len), at least max_input_len.
    Plugin flags and `paged_kv_cache` / `remove_input_padding` only matter to trtllm-build; the pytorch
    backend records them in `build_config`.
    """

    checkpoint_dir: Path
    output_dir: Path
    engine_backend: str = "pytorch"
    max_batch_size: int = 8
    max_input_len: int | None = None
    max_seq_len: int | None = None
    max_num_tokens: int | None = None
    max_beam_width: int = 1
    workers: int = 1
    gpt_attention_plugin: str = "auto"
    gemm_plugin: str = "auto"
    moe_plugin: str = "auto"
    paged_kv_cache: bool = True
    remove_input_padding: bool = True
    dry_run: bool = False


def default_max_input_len(max_seq_len: int) -> int:
    """The prompt limit when none is given: 1024 (trtllm-build's), at most half of `max_seq_len`."""
    return max(1, min(DEFAULT_MAX_INPUT_LEN, max_seq_len // 2))


def resolve_limits(settings: BuildSettings, pretrained: dict[str, Any]) -> EngineLimits:
    """Fill in the defaults and check the limits against each other and against the checkpoint.

    A limit given as 0 or less is an error, never replaced by a default.
    """
    for name, given in (("max_batch_size", settings.max_batch_size), ("max_input_len", settings.max_input_len),
                        ("max_seq_len", settings.max_seq_len), ("max_num_tokens", settings.max_num_tokens),
                        ("max_beam_width", settings.max_beam_width)):
        if given is not None and given < 1:
            raise ConfigError(f"{name} must be at least 1, got {given}")
    max_positions = _positive_int_or_none(pretrained.get("max_position_embeddings"), "max_position_embeddings")
    max_seq_len = settings.max_seq_len if settings.max_seq_len is not None else (max_positions or DEFAULT_MAX_SEQ_LEN)
    max_input_len = settings.max_input_len if settings.max_input_len is not None else (
        default_max_input_len(max_seq_len))
    if max_positions and max_seq_len > max_positions:
        raise ConfigError(f"max_seq_len {max_seq_len} is larger than the checkpoint's max_position_embeddings "
                          f"{max_positions}")
    if max_input_len >= max_seq_len:
        raise ConfigError(f"max_input_len ({max_input_len}) must be smaller than max_seq_len "
                          f"({max_seq_len}) to leave room for at least one output token")
    max_num_tokens = settings.max_num_tokens if settings.max_num_tokens is not None else max(
        max_input_len, min(DEFAULT_MAX_NUM_TOKENS, settings.max_batch_size * max_input_len))
    if max_num_tokens < max_input_len:
        raise ConfigError(f"max_num_tokens ({max_num_tokens}) must be at least max_input_len "
                          f"({max_input_len}): a whole prompt runs in one context step")
    return EngineLimits(settings.max_batch_size, max_input_len, max_seq_len, max_num_tokens,
                        settings.max_beam_width)


def _positive_int_or_none(value: Any, name: str) -> int | None:
    if value is None:
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"checkpoint config {name} {value!r} is not an integer") from None
    if number < 1:
        raise ConfigError(f"checkpoint config {name} must be at least 1, got {number}")
    return number


def _plugin(value: str, dtype: str) -> str:
    return dtype if value == "auto" else value


def build_config_section(settings: BuildSettings, limits: EngineLimits, dtype: str) -> dict[str, Any]:
    """`build_config` as trtllm-build writes it (the plugin part is informative for the pytorch backend)."""
    return {
        **asdict(limits),
        "kv_cache_type": "PAGED" if settings.paged_kv_cache else "CONTINUOUS",
        "plugin_config": {
            "gpt_attention_plugin": _plugin(settings.gpt_attention_plugin, dtype),
            "gemm_plugin": _plugin(settings.gemm_plugin, dtype),
            "moe_plugin": _plugin(settings.moe_plugin, dtype),
            "paged_kv_cache": settings.paged_kv_cache,
            "remove_input_padding": settings.remove_input_padding,
            "context_fmha": True,
        },
    }
