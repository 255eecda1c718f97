"""Random weights for the benchmark: any shape of a registered architecture (MPT, DBRX) without a Hugging Face
checkpoint, in exactly the layout `convert` writes for a rank (weight-only: the layout the pytorch build writes).

Nothing about the layout is spelled out here: the architecture's own `ModelSpec` (built from an HF config of
the requested sizes) gives the checkpoint config and, run on meta tensors, every rank tensor's name, canonical
shape and shard, so the benchmark always loads what a real converted model of that shape would give the engine.

Values: norms at 1, biases at 0, every matrix normal with std fan_in ** -0.5 (fan_in: the canonical tensor's
input size, i.e. summed over tensor-parallel ranks), so activations keep their scale through any number of
layers, as in a trained model. Weight-only tensors are drawn as random int8 (int4: random packed bytes) with a
per-channel scale giving that same std, so no quantization pass runs. Each rank draws from its own
`torch.Generator` on its device, so a 132B model's shards are made on the GPUs in seconds.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, cast

import torch

from generator.convert.models import ModelSpec, spec_for
from generator.convert.models.base import shard_tensor
from generator.errors import ConfigError
from generator.formats.dtypes import stored_dtype
from generator.formats.hf_checkpoint import HFCheckpoint
from generator.formats.mapping import Mapping
from generator.formats.weight_only import (
    WEIGHT_ONLY_ALGOS,
    is_weight_only_target,
    per_channel_scale_name,
)

ARCHITECTURES = ("mpt", "dbrx")
# std of a value drawn uniformly from the stored integers: int8 in [-127, 127], an int4 nibble in [-8, 7]
_LEVEL_STD = {"int8": math.sqrt((255 ** 2 - 1) / 12), "int4": math.sqrt((16 ** 2 - 1) / 12)}


def hf_config(arch: str, *, hidden: int, layers: int, heads: int, vocab: int, max_seq_len: int,
              kv_heads: int | None = None, intermediate: int | None = None, experts: int = 16, top_k: int = 4,
              rope_theta: float = 500000.0, clip_qkv: float | None = None) -> dict[str, Any]:
    """The HF config.json of a model of these sizes (what `convert` would read from a real checkpoint)."""
    common = {"d_model": hidden, "n_heads": heads, "n_layers": layers, "vocab_size": vocab,
              "max_seq_len": max_seq_len}
    if arch == "mpt":
        kv = kv_heads or heads
        return {**common, "model_type": "mpt", "no_bias": True, "expansion_ratio": 4,
                "ffn_config": {"ffn_hidden_size": intermediate or 4 * hidden},
                "attn_config": {"alibi": True, "alibi_bias_max": 8, "clip_qkv": clip_qkv,
                                "attn_type": "multihead_attention" if kv == heads else "grouped_query_attention",
                                "kv_n_heads": kv}}
    if arch == "dbrx":
        return {**common, "model_type": "dbrx", "tie_word_embeddings": False,
                "attn_config": {"kv_n_heads": kv_heads or heads, "clip_qkv": clip_qkv, "rope_theta": rope_theta},
                "ffn_config": {"ffn_hidden_size": intermediate or 7 * hidden // 4, "moe_num_experts": experts,
                               "moe_top_k": top_k, "ffn_act_fn": {"name": "silu"},
                               "moe_normalize_expert_weights": 1}}
    raise ConfigError(f"--arch {arch!r} is not one of {', '.join(ARCHITECTURES)}")


def checkpoint_config(spec: ModelSpec, mapping: Mapping, dtype: str, weight_only: str | None) -> dict[str, Any]:
    """The checkpoint's config.json, as `convert` writes it (`mapping` checked against the model first)."""
    spec.check_mapping(mapping)
    quantization = {"quant_algo": WEIGHT_ONLY_ALGOS[weight_only] if weight_only else None,
                    "kv_cache_quant_algo": None}
    config = spec.trtllm_config(mapping, dtype, quantization)
    if spec.extensions():
        config["gen_repo_extensions"] = spec.extensions()
    return config


class _MetaCheckpoint:
    """Stands in for an `HFCheckpoint`: every tensor the spec reads, as a meta tensor (a shape, no data)."""

    def __init__(self, spec: ModelSpec) -> None:
        self._shapes = spec.expected_hf_tensors()

    def get(self, name: str) -> torch.Tensor:
        return torch.empty(self._shapes[name], device="meta")

    def names(self) -> list[str]:
        return list(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def dtype(self, name: str) -> torch.dtype:
        return torch.float32

    def __contains__(self, name: object) -> bool:
        return name in self._shapes


def rank_shapes(spec: ModelSpec, mapping: Mapping) -> Iterator[tuple[str, tuple[int, ...], int]]:
    """(name, shape on this rank, fan_in of the canonical tensor) of every tensor `convert` writes for the rank."""
    checkpoint = cast(HFCheckpoint, _MetaCheckpoint(spec))
    layout = spec.shard_layout()
    for name, tensor in spec.rank_tensors(mapping):
        canonical = tensor.source(checkpoint)
        shard = shard_tensor(canonical, tensor.rule, layout, mapping)
        yield name, tuple(shard.shape), int(canonical.shape[-1])


def random_rank_weights(spec: ModelSpec, mapping: Mapping, dtype: torch.dtype, weight_only: str | None,
                        device: torch.device, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """This rank's random tensors on `device`, one at a time, in the order and layout of its rank file."""
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, shape, fan_in in rank_shapes(spec, mapping):
        if len(shape) == 1:  # norms and biases
            fill = 0.0 if name.endswith(".bias") else 1.0
            yield name, torch.full(shape, fill, dtype=stored_dtype(name, dtype), device=device)
            continue
        std = fan_in ** -0.5
        if weight_only and is_weight_only_target(name):
            yield from _quantized(name, shape, std, dtype, weight_only, device, generator)
            continue
        tensor = torch.empty(shape, dtype=stored_dtype(name, dtype), device=device)
        yield name, tensor.normal_(0.0, std, generator=generator)


def _quantized(name: str, shape: tuple[int, ...], std: float, dtype: torch.dtype, precision: str,
               device: torch.device, generator: torch.Generator) -> Iterator[tuple[str, torch.Tensor]]:
    """A weight-only weight `[.., out, in]` as the build stores it: integers `[.., in, out]` (int4: two per byte,
    `[.., in, out / 2]`) and the per-channel scale `[.., out]`."""
    *experts, outputs, inputs = shape
    if precision == "int4" and outputs % 2:
        raise ConfigError(f"int4 weight-only packs two output channels per byte: {name} has {outputs}")
    columns = outputs // 2 if precision == "int4" else outputs
    low = -128 if precision == "int4" else -127  # any byte is two valid nibbles; int8 stays symmetric
    values = torch.randint(low, 128, (*experts, inputs, columns), dtype=torch.int8, device=device,
                           generator=generator)
    yield name, values
    scale = torch.full((*experts, outputs), std / _LEVEL_STD[precision], dtype=dtype, device=device)
    yield per_channel_scale_name(name), scale


def model_spec(arch: str, **sizes: Any) -> ModelSpec:
    """The architecture's spec for a model of these sizes (see `hf_config`)."""
    return spec_for(hf_config(arch, **sizes))
