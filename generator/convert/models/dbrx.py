"""DBRX (HF `DbrxForCausalLM`): GQA attention with RoPE and clip_qkv, a 16-expert top-4 MoE with SwiGLU experts.

TensorRT-LLM layout (architecture "DbrxForCausalLM"), as its DBRX converter writes it:

| HF tensor                                       | TensorRT-LLM tensor                       | split |
|-------------------------------------------------|-------------------------------------------|-------|
| transformer.wte.weight                          | transformer.vocab_embedding.weight (first pp stage) | replicated |
| blocks.i.norm_attn_norm.norm_1.weight / norm_2  | layers.j.input_layernorm / post_layernorm  | replicated |
| blocks.i.norm_attn_norm.attn.Wqkv.weight        | layers.j.attention.qkv.weight              | Q, K, V by heads |
| blocks.i.norm_attn_norm.attn.out_proj.weight    | layers.j.attention.dense.weight            | dim 1 |
| blocks.i.ffn.router.layer.weight [E, d]         | layers.j.mlp.router.weight, float32        | replicated |
| blocks.i.ffn.experts.mlp.v1 (up), w1 (gate) [E*F, d] | layers.j.mlp.fc.weight [E, 2F, d] = [up; gate] per expert | experts over EP, F over MoE-TP |
| blocks.i.ffn.experts.mlp.w2 [E*F, d]            | layers.j.mlp.proj.weight [E, d, F] (transposed) | experts over EP, dim 2 over MoE-TP |
| transformer.norm_f.weight                       | transformer.ln_f.weight (last pp stage)    | replicated |
| lm_head.weight (untied)                         | lm_head.weight (last pp stage)             | rows, zero-padded to a multiple of tp |

Routing: transformers softmaxes the router logits over all experts, takes the top k and divides the k weights by
their p-norm (`moe_normalize_expert_weights` = p) when p is set. TensorRT-LLM's RENORMALIZE (1) equals p = 1;
NONE (0) equals p = null. The config always carries `moe_normalize_expert_weights` too, so gen-repo's engine can
follow transformers exactly for any p (TensorRT-LLM ignores the extra key; for p other than 1 or null the
config also lists it in `gen_repo_extensions`, since TensorRT-LLM would renormalize with p = 1).

Beyond conversion: transformers 5 reads DBRX's RoPE base from `rope_parameters` (not `attn_config.rope_theta`)
and wants a float normalization exponent, so calibration fixes the loaded config
(`adapt_transformers_config`); the real checkpoints ship a tiktoken tokenizer, and so does the tiny model.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch

from generator.convert.models.base import (
    REPLICATED,
    CanonicalTensor,
    ModelSpec,
    ShardRule,
    TensorSource,
    TinyShape,
    config_value,
    hf_get,
    merged_config,
    positive_int,
    register,
)
from generator.convert.models.mpt import mpt_shard_rule
from generator.errors import ConfigError
from generator.formats.hf_checkpoint import HFCheckpoint
from generator.formats.mapping import Mapping

NORMALIZATION_NONE = 0
NORMALIZATION_RENORMALIZE = 1


@register
class DbrxSpec(ModelSpec):
    """DBRX, configured from the HF config.json."""

    name: ClassVar[str] = "dbrx"
    architecture: ClassVar[str] = "DbrxForCausalLM"
    hf_model_types: ClassVar[tuple[str, ...]] = ("dbrx",)
    calibration_qkv_modules: ClassVar[str] = r"(?:^|\.)blocks\.(\d+)\.norm_attn_norm\.attn\.Wqkv$"
    tiny_tokenizer: ClassVar[Literal["hf", "tiktoken"]] = "tiktoken"

    def __init__(self, hf_config: dict[str, Any]) -> None:
        super().__init__(hf_config)
        config = hf_config
        attn = config.get("attn_config") or {}
        ffn = config.get("ffn_config") or {}
        try:
            self.hidden_size = positive_int(config, "d_model")
            self.num_attention_heads = positive_int(config, "n_heads")
            self.num_layers = positive_int(config, "n_layers")
            self.vocab_size = positive_int(config, "vocab_size")
            self.max_seq_len = positive_int(config, "max_seq_len")
            self.intermediate_size = positive_int(ffn, "ffn_hidden_size", "ffn_config.")
            self.num_experts = positive_int(ffn, "moe_num_experts", "ffn_config.")
        except KeyError as error:
            raise ConfigError(f"DBRX config.json lacks {error.args[0]}") from error
        self.num_key_value_heads = positive_int(attn, "kv_n_heads", "attn_config.", 1)
        self.top_k = positive_int(ffn, "moe_top_k", "ffn_config.", 1)
        self.normalize_expert_weights = ffn.get("moe_normalize_expert_weights", 1)
        self.clip_qkv = attn.get("clip_qkv")
        self.rotary_base = float(config_value(attn, "rope_theta", 10000.0))
        self.tied = bool(config_value(config, "tie_word_embeddings", False))
        act = config_value(ffn, "ffn_act_fn", {"name": "silu"})
        if act.get("name") != "silu":
            raise ConfigError(f"ffn_config.ffn_act_fn {act!r} is not supported (only silu)")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"d_model {self.hidden_size} is not divisible by n_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"n_heads {self.num_attention_heads} is not divisible by attn_config.kv_n_heads "
                              f"{self.num_key_value_heads}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"ffn_config.moe_top_k {self.top_k} must be between 1 and moe_num_experts "
                              f"{self.num_experts}")

    @property
    def normalization_mode(self) -> int:
        """TensorRT-LLM's ExpertScaleNormalizationMode: NONE when transformers does not renormalize."""
        return NORMALIZATION_NONE if self.normalize_expert_weights is None else NORMALIZATION_RENORMALIZE

    def extensions(self) -> list[str]:
        p = self.normalize_expert_weights
        return [] if p is None or p == 1 else [f"moe_normalize_expert_weights={p}"]

    def check_mapping(self, mapping: Mapping) -> None:
        super().check_mapping(mapping)
        if self.num_experts % mapping.moe_expert_parallel_size:
            raise ConfigError(f"--moe-ep-size {mapping.moe_expert_parallel_size} does not divide the number of "
                              f"experts ({self.num_experts}, config ffn_config.moe_num_experts)")
        if self.intermediate_size % mapping.moe_tensor_parallel_size:
            raise ConfigError(f"--moe-tp-size {mapping.moe_tensor_parallel_size} does not divide the expert "
                              f"size ({self.intermediate_size}, config ffn_config.ffn_hidden_size)")

    def trtllm_config(self, mapping: Mapping, dtype: str, quantization: dict[str, Any]) -> dict[str, Any]:
        return {
            **self.decoder_config(mapping, dtype, quantization),
            "norm_epsilon": 1e-5,
            "position_embedding_type": "rope_gpt_neox",
            "hidden_act": "swiglu",
            "rotary_base": self.rotary_base,
            "rotary_scaling": None,
            "moe": {"num_experts": self.num_experts, "top_k": self.top_k,
                    "normalization_mode": self.normalization_mode},
            "moe_normalize_expert_weights": self.normalize_expert_weights,
            "bias": False,
            "clip_qkv": self.clip_qkv,
            "dense_context_fmha": False,
            "disable_weight_only_quant_plugin": False,
        }

    def expected_hf_tensors(self) -> dict[str, tuple[int, ...]]:
        d, experts, ffn = self.hidden_size, self.num_experts, self.intermediate_size
        qkv_rows = d + 2 * self.num_key_value_heads * self.head_size
        shapes: dict[str, tuple[int, ...]] = {"transformer.wte.weight": (self.vocab_size, d),
                                              "transformer.norm_f.weight": (d,)}
        if not self.tied:
            shapes["lm_head.weight"] = (self.vocab_size, d)
        for i in range(self.num_layers):
            block = f"transformer.blocks.{i}."
            shapes.update({
                block + "norm_attn_norm.norm_1.weight": (d,), block + "norm_attn_norm.norm_2.weight": (d,),
                block + "norm_attn_norm.attn.Wqkv.weight": (qkv_rows, d),
                block + "norm_attn_norm.attn.out_proj.weight": (d, d),
                block + "ffn.router.layer.weight": (experts, d),
                block + "ffn.experts.mlp.w1": (experts * ffn, d), block + "ffn.experts.mlp.v1": (experts * ffn, d),
                block + "ffn.experts.mlp.w2": (experts * ffn, d)})
        return shapes

    def optional_hf_tensors(self) -> set[str]:
        return {"lm_head.weight"}

    def layer_tensors(self, layer: int) -> list[CanonicalTensor]:
        hf, trt = f"transformer.blocks.{layer}.", f"transformer.layers.{layer}."
        rule = self.shard_rule
        return [
            CanonicalTensor(trt + "input_layernorm.weight", hf_get(hf + "norm_attn_norm.norm_1.weight"), REPLICATED),
            CanonicalTensor(trt + "attention.qkv.weight", hf_get(hf + "norm_attn_norm.attn.Wqkv.weight"),
                            rule("attention.qkv.weight")),
            CanonicalTensor(trt + "attention.dense.weight", hf_get(hf + "norm_attn_norm.attn.out_proj.weight"),
                            rule("attention.dense.weight")),
            CanonicalTensor(trt + "post_layernorm.weight", hf_get(hf + "norm_attn_norm.norm_2.weight"), REPLICATED),
            CanonicalTensor(trt + "mlp.router.weight", hf_get(hf + "ffn.router.layer.weight"), REPLICATED),
            CanonicalTensor(trt + "mlp.fc.weight", self._experts_fc(hf + "ffn.experts.mlp."), rule("mlp.fc.weight")),
            CanonicalTensor(trt + "mlp.proj.weight", self._experts_proj(hf + "ffn.experts.mlp.w2"),
                            rule("mlp.proj.weight")),
        ]

    def _experts_fc(self, prefix: str) -> TensorSource:
        shape = (self.num_experts, self.intermediate_size, self.hidden_size)

        def read(checkpoint: HFCheckpoint) -> torch.Tensor:
            # up (v1, no activation) first, gate (w1, SiLU) second: TensorRT-LLM's swiglu order.
            # Filled half by half so that only one HF tensor is alive beside the result.
            up = checkpoint.get(prefix + "v1").view(shape)
            fused = up.new_empty(shape[0], 2 * shape[1], shape[2])
            fused[:, : shape[1]] = up
            del up
            fused[:, shape[1]:] = checkpoint.get(prefix + "w1").view(shape)
            return fused
        return read

    def _experts_proj(self, name: str) -> TensorSource:
        shape = (self.num_experts, self.intermediate_size, self.hidden_size)
        # HF computes x @ w2[e] (w2[e] is [F, d], no transpose); TensorRT-LLM wants [out, in] = [d, F]
        return lambda checkpoint: checkpoint.get(name).view(shape).transpose(1, 2)

    def first_stage_tensors(self) -> list[CanonicalTensor]:
        return [CanonicalTensor("transformer.vocab_embedding.weight", hf_get("transformer.wte.weight"), REPLICATED)]

    def last_stage_tensors(self) -> list[CanonicalTensor]:
        lm_head = "transformer.wte.weight" if self.tied else "lm_head.weight"
        return [CanonicalTensor("transformer.ln_f.weight", hf_get("transformer.norm_f.weight"), REPLICATED),
                CanonicalTensor("lm_head.weight", hf_get(lm_head), self.shard_rule("lm_head.weight"))]

    @classmethod
    def shard_rule(cls, name: str) -> ShardRule:
        return dbrx_shard_rule(name)

    # --- other stages --------------------------------------------------------------------------------------

    @classmethod
    def adapt_transformers_config(cls, config: Any) -> None:
        """transformers 5 reads RoPE from `rope_parameters` and wants a float normalization exponent."""
        attn, ffn = getattr(config, "attn_config", None), getattr(config, "ffn_config", None)
        theta = getattr(attn, "rope_theta", None)
        if theta is not None:
            config.rope_parameters = {"rope_theta": float(theta), "rope_type": "default"}
        norm = getattr(ffn, "moe_normalize_expert_weights", None)
        if isinstance(norm, int):
            ffn.moe_normalize_expert_weights = float(norm)  # type: ignore[union-attr]

    @classmethod
    def tiny_hf_model(cls, shape: TinyShape, **hf_overrides: Any) -> torch.nn.Module:
        from transformers import DbrxConfig, DbrxForCausalLM

        theta = shape.rope_theta or 10000.0
        # transformers' DBRX clamps with clip_qkv unconditionally (None fails): default to the real models' 8
        clip = 8.0 if shape.clip_qkv is None else shape.clip_qkv
        fields = {
            "d_model": shape.hidden_size, "n_heads": shape.num_attention_heads, "n_layers": shape.num_hidden_layers,
            "max_seq_len": shape.max_position_embeddings, "vocab_size": shape.vocab_size,
            "attn_config": {"kv_n_heads": shape.num_key_value_heads or shape.num_attention_heads,
                            "clip_qkv": clip, "rope_theta": theta},
            "ffn_config": {"ffn_hidden_size": shape.intermediate_size or 3 * shape.hidden_size // 2,
                           "moe_num_experts": shape.num_experts, "moe_top_k": shape.experts_per_token,
                           "ffn_act_fn": {"name": "silu"}, "moe_normalize_expert_weights": 1.0},
            # transformers 5.x reads RoPE from rope_parameters and ignores attn_config.rope_theta: write both
            "rope_parameters": {"rope_theta": theta, "rope_type": "default"}, "tie_word_embeddings": False}
        return DbrxForCausalLM(DbrxConfig(**merged_config(fields, hf_overrides)))


def dbrx_shard_rule(name: str) -> ShardRule:
    """Tensor-parallel rule of a TensorRT-LLM DBRX tensor name."""
    if name.endswith("mlp.fc.weight"):
        return ShardRule("experts_fc", 1)
    if name.endswith("mlp.proj.weight"):
        return ShardRule("experts", 2)
    if name.endswith("mlp.router.weight"):
        return REPLICATED
    return mpt_shard_rule(name)
