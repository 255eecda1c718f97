"""The engine's view of a model: the checkpoint's `pretrained_config` plus the build limits.

The engine dir (or a bare checkpoint dir, with default limits) is read by `generator.formats.engine_dir`, the
reader every stage uses; this module only turns the model part into what the pytorch engine can run, refusing
(ConfigError) what it cannot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from generator.errors import ConfigError
from generator.formats.dtypes import model_dtype
from generator.formats.engine_dir import (
    engine_limits,
    read_engine_dir,
    tokens_per_block,
)
from generator.formats.mapping import Mapping
from generator.formats.trtllm_checkpoint import read_mapping
from generator.formats.weight_only import weight_only_precision

SUPPORTED_POSITION_EMBEDDINGS = ("alibi", "rope_gpt_neox", "learned_absolute")
SUPPORTED_ACTIVATIONS = ("gelu", "swiglu")


@dataclass(frozen=True)
class MoeConfig:
    """Mixture-of-experts routing: top-k of `num_experts`, weights divided by their p-norm (None: no division)."""

    num_experts: int
    top_k: int
    normalize_p: float | None


@dataclass(frozen=True)
class EngineConfig:
    """Everything the model runner and the executor read from an engine (or checkpoint) dir.

    Deliberately without the checkpoint's `architecture`: the engine runs any model from these fields (position
    embedding, activation, MoE section, clip_qkv, norms and biases by the tensors present), so an architecture
    that needs something new adds a field its converter writes, not a name check here.
    """

    dtype: torch.dtype
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_size: int
    position_embedding_type: str
    hidden_act: str
    norm_epsilon: float
    max_position_embeddings: int | None
    clip_qkv: float | None
    alibi_bias_max: float
    rotary_base: float
    moe: MoeConfig | None
    quant_algo: str | None
    kv_cache_quant_algo: str | None
    use_parallel_embedding: bool
    embedding_sharding_dim: int
    mapping: Mapping
    max_batch_size: int
    max_input_len: int
    max_seq_len: int
    max_num_tokens: int
    tokens_per_block: int  # KV cache block size (build_config's, else the engine's default)
    pretrained_config: dict[str, Any]

    @property
    def world_size(self) -> int:
        return self.mapping.world_size

    def kv_heads_per_rank(self) -> int:
        """KV heads each TP rank holds: the converter replicates KV heads when there are fewer than TP ranks."""
        return max(1, self.num_kv_heads // self.mapping.tensor_parallel_size)

    def heads_per_rank(self) -> int:
        return self.num_heads // self.mapping.tensor_parallel_size


def _moe_config(pretrained: dict[str, Any]) -> MoeConfig | None:
    section = dict(pretrained.get("moe") or pretrained.get("moe_config") or {})
    num_experts = int(section.get("num_experts", pretrained.get("moe_num_experts", 0)) or 0)
    if num_experts <= 1:
        return None
    top_k = int(section.get("top_k", pretrained.get("moe_top_k", 1)))
    # HF DBRX divides the top-k weights by their p-norm; TRT-LLM's converter only writes a mode (1 = renormalize)
    key = "moe_normalize_expert_weights"
    if key in section or key in pretrained:
        value = section.get(key, pretrained.get(key))
        normalize_p = None if value is None else float(value)
    else:
        mode = int(section.get("normalization_mode", pretrained.get("moe_normalization_mode", 1)))
        if mode not in (0, 1):
            raise ConfigError(f"moe normalization_mode {mode} is not supported (only 0 = none, 1 = renormalize)")
        normalize_p = 1.0 if mode == 1 else None
    return MoeConfig(num_experts, top_k, normalize_p)


def parse_pretrained_config(pretrained: dict[str, Any], build: dict[str, Any] | None = None) -> EngineConfig:
    """Turn a TensorRT-LLM `pretrained_config` (+ optional `build_config`) into an `EngineConfig`."""
    build = build or {}
    try:
        dtype = model_dtype(str(pretrained.get("dtype", "float32")))  # ConfigError for any other
        hidden = int(pretrained["hidden_size"])
        heads = int(pretrained["num_attention_heads"])
        kv_heads = int(pretrained.get("num_key_value_heads") or heads)
        head_size = int(pretrained.get("head_size") or hidden // heads)
        position = str(pretrained.get("position_embedding_type", "learned_absolute"))
        if position not in SUPPORTED_POSITION_EMBEDDINGS:
            raise ConfigError(f"position_embedding_type {position!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED_POSITION_EMBEDDINGS)})")
        act = str(pretrained.get("hidden_act", "gelu"))
        if act not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(f"hidden_act {act!r} is not supported (supported: {', '.join(SUPPORTED_ACTIVATIONS)})")
        quant = dict(pretrained.get("quantization") or {})
        quant_algo = quant.get("quant_algo")
        if quant_algo is not None and weight_only_precision(quant_algo) is None:
            raise ConfigError(f"quant_algo {quant_algo!r} is not supported by the pytorch engine "
                              "(supported: none, W8A16, W4A16)")
        kv_algo = quant.get("kv_cache_quant_algo")
        if kv_algo not in (None, "INT8"):
            raise ConfigError(f"kv_cache_quant_algo {kv_algo!r} is not supported (supported: none, INT8)")
        mapping = read_mapping(pretrained)
        if heads % mapping.tensor_parallel_size:
            raise ConfigError(f"num_attention_heads {heads} is not divisible by tp_size {mapping.tensor_parallel_size}")
        max_pos = pretrained.get("max_position_embeddings")
        limits = engine_limits(pretrained, build)
        clip = pretrained.get("clip_qkv")
        return EngineConfig(
            dtype=dtype.torch,
            vocab_size=int(pretrained["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(pretrained.get("intermediate_size") or 4 * hidden),
            num_layers=int(pretrained["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_size=head_size,
            position_embedding_type=position,
            hidden_act=act,
            norm_epsilon=float(pretrained.get("norm_epsilon") or 1e-5),
            max_position_embeddings=int(max_pos) if max_pos else None,
            clip_qkv=float(clip) if clip else None,
            alibi_bias_max=float(pretrained.get("alibi_bias_max") or 8),
            rotary_base=float(pretrained.get("rotary_base") or 10000.0),
            moe=_moe_config(pretrained),
            quant_algo=quant_algo,
            kv_cache_quant_algo=kv_algo,
            use_parallel_embedding=bool(pretrained.get("use_parallel_embedding", False)),
            embedding_sharding_dim=int(pretrained.get("embedding_sharding_dim", 0)),
            mapping=mapping,
            max_batch_size=limits.max_batch_size,
            max_input_len=limits.max_input_len,
            max_seq_len=limits.max_seq_len,
            max_num_tokens=limits.max_num_tokens,
            tokens_per_block=tokens_per_block(build),
            pretrained_config=pretrained,
        )
    except KeyError as error:
        raise ConfigError(f"checkpoint config lacks the required key {error}") from error


def load_engine_config(directory: Path) -> EngineConfig:
    """Read an engine dir (`pretrained_config` + `build_config`) or a bare checkpoint dir."""
    engine = read_engine_dir(directory)
    return parse_pretrained_config(engine.pretrained, engine.build)


def alibi_slopes(num_heads: int, alibi_bias_max: float) -> torch.Tensor:
    """ALiBi slopes of all heads, exactly as MPT's `gen_slopes` / HF `build_mpt_alibi_tensor` compute them
    (float32; non-power-of-2 head counts interleave the slopes of the next power of two)."""
    power = 2 ** math.ceil(math.log2(num_heads))
    base = torch.arange(1, power + 1, dtype=torch.int64).float() * (alibi_bias_max / power)
    slopes = 1.0 / torch.pow(2, base)
    if power != num_heads:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:num_heads]
    return slopes
