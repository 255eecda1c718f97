"""MPT (MPT-7B, MPT-30B, Replit Code v1.5 3B): HF `MptForCausalLM` / llm-foundry `MPTForCausalLM`.

Base layout, as TensorRT-LLM's own MPT converter writes it (architecture "MPTForCausalLM"):

| HF tensor                          | TensorRT-LLM tensor                        | tensor-parallel split |
|------------------------------------|--------------------------------------------|-----------------------|
| transformer.wte.weight             | transformer.vocab_embedding.weight (first pp stage) | replicated   |
|                                    | lm_head.weight (last pp stage, tied copy)  | rows, zero-padded to a multiple of tp |
| transformer.blocks.i.norm_1.weight | transformer.layers.j.input_layernorm.weight| replicated            |
| transformer.blocks.i.attn.Wqkv.weight | transformer.layers.j.attention.qkv.weight | Q, K, V by heads -> [Q_r; K_r; V_r] |
| transformer.blocks.i.attn.out_proj.weight | ...attention.dense.weight           | dim 1                 |
| transformer.blocks.i.norm_2.weight | ...post_layernorm.weight                   | replicated            |
| transformer.blocks.i.ffn.up_proj.weight | ...mlp.fc.weight                      | dim 0                 |
| transformer.blocks.i.ffn.down_proj.weight | ...mlp.proj.weight                  | dim 1                 |
| transformer.norm_f.weight          | transformer.ln_f.weight (last pp stage)    | replicated            |

`j` is the layer index local to the pipeline stage. GQA/MQA (`attn_config.attn_type` grouped_query_attention /
multiquery_attention, as llm-foundry defines them): K and V carry `num_key_value_heads` heads; when tp_size is
larger, each rank holds KV head `tp_rank // (tp_size / kv_heads)` and config `num_key_value_heads` stays the real
count (the engine uses max(1, kv_heads // tp_size) per rank).

Extensions TensorRT-LLM lacks (the contract with gen-repo's pytorch engine; trtllm-build would reject or ignore
them, so `generator.convert.job` prints a note and lists the ones used in the config key `gen_repo_extensions`):

- `bias: true` (HF `no_bias: false`): `.bias` tensors beside `attention.qkv` (split like the weight rows),
  `attention.dense` (NOT split: every rank holds the full bias; the engine adds it once, after the all-reduce),
  `mlp.fc` (split dim 0), `mlp.proj` (full, added after the all-reduce), `input_layernorm`, `post_layernorm`
  and `transformer.ln_f`. transformers' MPT has no norm biases; zeros are written for them then.
- `qk_layernorm: true` (HF `attn_config.qk_ln`): `transformer.layers.j.attention.q_layernorm.{weight,bias}`
  [hidden_size] and `...k_layernorm.{weight,bias}` [kv_heads * head_size], LayerNorms applied to the whole q and
  k before the head split (after clip_qkv). The biases are always written (zeros when the model has none).
  Only tp_size 1.
- `position_embedding_type: "learned_absolute"` (HF `attn_config.alibi: false` with `learned_pos_emb`):
  `transformer.position_embedding.weight` [max_seq_len, hidden_size] on the first pp stage, replicated.
- `logit_scale` (a number, or "inv_sqrt_d_model" = 1/sqrt(d_model)) is folded into `lm_head.weight`.
- `alibi_bias_max` and `clip_qkv` come from `attn_config`.

Everything else that changes the forward pass (softmax_scale, prefix_lm, attn_uses_sequence_id, rope,
sliding windows, embedding_fraction != 1, other norm types, GLU or Transformer-Engine FFNs) fails with a
ConfigError naming the field.

Beyond conversion (the rest of the MPT knowledge, asked for through `ModelSpec`):
- trtllm-build: TensorRT-LLM 1.2's MPT (`tensorrt_llm/models/mpt/model.py`) has none of the extensions above,
  hard-codes an MLP of 4 x hidden_size and runs every layer on one pipeline stage (`check_trtllm_build`).
- INT8 KV calibration: transformers' `MptForCausalLM` is MHA only (it ignores `attn_config.attn_type` and
  `kv_n_heads`) and builds no biases, q/k LayerNorms or learned positions, so calibration loads the weights into
  an MHA model with the KV heads repeated, or refuses and asks for the checkpoint's own code
  (`calibration_model`).
- The tiny model: transformers' `MptForCausalLM` with ALiBi and no biases (`tiny_hf_model`).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, ClassVar

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
from generator.errors import ConfigError, GenRepoError
from generator.formats.hf_checkpoint import HFCheckpoint
from generator.formats.mapping import Mapping

SUPPORTED_NORMS = ("low_precision_layernorm", "layernorm")


@register
class MptSpec(ModelSpec):
    """MPT family, configured from the HF (llm-foundry) config.json."""

    name: ClassVar[str] = "mpt"
    architecture: ClassVar[str] = "MPTForCausalLM"
    hf_model_types: ClassVar[tuple[str, ...]] = ("mpt",)
    calibration_qkv_modules: ClassVar[str] = r"(?:^|\.)blocks\.(\d+)\.attn\.Wqkv$"

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
        except KeyError as error:
            raise ConfigError(f"MPT config.json lacks {error.args[0]}") from error
        attn_type = config_value(attn, "attn_type", "multihead_attention")
        if attn_type == "multihead_attention":
            self.num_key_value_heads = self.num_attention_heads
        elif attn_type == "multiquery_attention":
            self.num_key_value_heads = 1
        elif attn_type == "grouped_query_attention":
            self.num_key_value_heads = positive_int(attn, "kv_n_heads", "attn_config.", self.num_attention_heads)
        else:
            raise ConfigError(f"attn_config.attn_type {attn_type!r} is not supported")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"d_model {self.hidden_size} is not divisible by n_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"n_heads {self.num_attention_heads} is not divisible by attn_config.kv_n_heads "
                              f"{self.num_key_value_heads}")
        if ffn.get("ffn_hidden_size") is not None:
            self.intermediate_size = positive_int(ffn, "ffn_hidden_size", "ffn_config.")
        else:
            ratio = config_value(config, "expansion_ratio", 4)
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or ratio <= 0:
                raise ConfigError(f"expansion_ratio {ratio!r} is not a positive number")
            self.intermediate_size = int(ratio * self.hidden_size)
        self.bias = not config_value(config, "no_bias", True)
        self.alibi = bool(config_value(attn, "alibi", True))
        self.learned_positions = not self.alibi and bool(config_value(config, "learned_pos_emb", True))
        self.alibi_bias_max = config_value(attn, "alibi_bias_max", 8)
        self.clip_qkv = attn.get("clip_qkv")
        self.qk_layernorm = bool(config_value(attn, "qk_ln", False))
        self.norm_epsilon = float(config_value(config, "layer_norm_epsilon", 1e-5))
        self.logit_scale = self._logit_scale(config.get("logit_scale"))
        self.tied = bool(config_value(config, "tie_word_embeddings", True))
        self._reject_unsupported(config, attn, ffn)

    def _logit_scale(self, value: Any) -> float | None:
        if value is None:
            return None
        if value == "inv_sqrt_d_model":
            return 1.0 / math.sqrt(self.hidden_size)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"logit_scale {value!r} is not supported (a number or 'inv_sqrt_d_model')")

    def _reject_unsupported(self, config: dict[str, Any], attn: dict[str, Any], ffn: dict[str, Any]) -> None:
        """Fail on fields that change the forward pass in ways neither engine implements."""
        problems = []
        if attn.get("softmax_scale") is not None:
            problems.append("attn_config.softmax_scale is set")
        if attn.get("prefix_lm"):
            problems.append("attn_config.prefix_lm is true")
        if attn.get("attn_uses_sequence_id"):
            problems.append("attn_config.attn_uses_sequence_id is true")
        if attn.get("rope"):
            problems.append("attn_config.rope is true")
        if config_value(attn, "sliding_window_size", -1) != -1:
            problems.append("attn_config.sliding_window_size is set")
        if not self.alibi and not self.learned_positions:
            problems.append("attn_config.alibi is false and learned_pos_emb is false (no position information)")
        if float(config_value(config, "embedding_fraction", 1.0)) != 1.0:
            problems.append(f"embedding_fraction is {config['embedding_fraction']} (only 1.0)")
        norm_type = str(config_value(config, "norm_type", "low_precision_layernorm")).lower()
        if norm_type not in SUPPORTED_NORMS:
            problems.append(f"norm_type {norm_type!r} (only {', '.join(SUPPORTED_NORMS)})")
        ffn_type = config_value(ffn, "ffn_type", "mptmlp")
        if ffn_type != "mptmlp":
            problems.append(f"ffn_config.ffn_type {ffn_type!r} (only 'mptmlp')")
        act = ffn.get("ffn_act_fn")
        if act is not None and (act.get("name") != "gelu" or act.get("approximate", "none") != "none"):
            problems.append(f"ffn_config.ffn_act_fn {act!r} (only exact gelu)")
        if config_value(config, "fc_type", "torch") not in ("torch", {"name": "torch"}):
            problems.append(f"fc_type {config['fc_type']!r} (only 'torch')")
        if config.get("block_overrides"):
            problems.append("block_overrides is set")
        if problems:
            raise ConfigError("unsupported MPT variant: " + "; ".join(problems))

    def extensions(self) -> list[str]:
        return [name for name, used in (("bias", self.bias), ("qk_layernorm", self.qk_layernorm),
                                        ("learned_absolute", self.learned_positions)) if used]

    def check_mapping(self, mapping: Mapping) -> None:
        super().check_mapping(mapping)
        if mapping.moe_expert_parallel_size != 1:
            raise ConfigError("--moe-ep-size / --moe-tp-size apply to mixture-of-experts models (DBRX) only; "
                              "MPT has no experts")
        if self.qk_layernorm and mapping.tensor_parallel_size > 1:
            raise ConfigError("attn_config.qk_ln (LayerNorm over the whole q and k) needs --tp-size 1, "
                              f"got {mapping.tensor_parallel_size}")

    def trtllm_config(self, mapping: Mapping, dtype: str, quantization: dict[str, Any]) -> dict[str, Any]:
        return {
            **self.decoder_config(mapping, dtype, quantization),
            "position_embedding_type": "alibi" if self.alibi else "learned_absolute",
            "hidden_act": "gelu",
            "norm_epsilon": self.norm_epsilon,
            "bias": self.bias,
            "qk_layernorm": self.qk_layernorm,
            "clip_qkv": self.clip_qkv,
            "alibi_bias_max": self.alibi_bias_max,
        }

    # --- tensors -------------------------------------------------------------------------------------------

    def expected_hf_tensors(self) -> dict[str, tuple[int, ...]]:
        d, kv_rows, ffn = self.hidden_size, self.num_key_value_heads * self.head_size, self.intermediate_size
        qkv_rows = d + 2 * kv_rows
        shapes: dict[str, tuple[int, ...]] = {"transformer.wte.weight": (self.vocab_size, d),
                                              "transformer.norm_f.weight": (d,)}
        if self.learned_positions:
            shapes["transformer.wpe.weight"] = (self.max_seq_len, d)
        for i in range(self.num_layers):
            block = f"transformer.blocks.{i}."
            shapes.update({block + "norm_1.weight": (d,), block + "attn.Wqkv.weight": (qkv_rows, d),
                           block + "attn.out_proj.weight": (d, d), block + "norm_2.weight": (d,),
                           block + "ffn.up_proj.weight": (ffn, d), block + "ffn.down_proj.weight": (d, ffn)})
            if self.bias:
                shapes.update({block + "attn.Wqkv.bias": (qkv_rows,), block + "attn.out_proj.bias": (d,),
                               block + "ffn.up_proj.bias": (ffn,), block + "ffn.down_proj.bias": (d,)})
            if self.qk_layernorm:
                shapes.update({block + "attn.q_ln.weight": (d,), block + "attn.k_ln.weight": (kv_rows,)})
        return shapes

    def optional_hf_tensors(self) -> set[str]:
        """Norm biases (llm-foundry has them with no_bias false, transformers never) and lm_head copies."""
        names = {"lm_head.weight", "transformer.lm_head.weight"}
        if self.bias:
            names |= {"transformer.norm_f.bias"}
            for i in range(self.num_layers):
                block = f"transformer.blocks.{i}."
                names |= {block + "norm_1.bias", block + "norm_2.bias"}
                if self.qk_layernorm:
                    names |= {block + "attn.q_ln.bias", block + "attn.k_ln.bias"}
        return names

    def check_hf_checkpoint(self, checkpoint: HFCheckpoint) -> None:
        if self.bias and not any(name.endswith("attn.Wqkv.bias") for name in checkpoint.names()):
            # transformers' MptForCausalLM builds every Linear without bias whatever no_bias says, so a
            # checkpoint it saved with no_bias false has no biases: its forward pass is the bias-free one
            self.bias = False
        super().check_hf_checkpoint(checkpoint)
        if not self.tied and self._untied_lm_head(checkpoint) is None:
            raise ConfigError("tie_word_embeddings is false but the checkpoint has no lm_head.weight")

    @staticmethod
    def _untied_lm_head(checkpoint: HFCheckpoint) -> str | None:
        for name in ("lm_head.weight", "transformer.lm_head.weight"):
            if name in checkpoint:
                return name
        return None

    def _norm(self, hf_prefix: str, trt_prefix: str, size: int) -> list[CanonicalTensor]:
        tensors = [CanonicalTensor(trt_prefix + ".weight", hf_get(hf_prefix + ".weight"), REPLICATED)]
        if self.bias:
            tensors.append(CanonicalTensor(trt_prefix + ".bias", _bias_or_zeros(hf_prefix + ".bias", size),
                                           REPLICATED))
        return tensors

    def _linear(self, hf_prefix: str, trt_prefix: str, weight_rule: ShardRule,
                bias_rule: ShardRule) -> list[CanonicalTensor]:
        tensors = [CanonicalTensor(trt_prefix + ".weight", hf_get(hf_prefix + ".weight"), weight_rule)]
        if self.bias:
            tensors.append(CanonicalTensor(trt_prefix + ".bias", hf_get(hf_prefix + ".bias"), bias_rule))
        return tensors

    def layer_tensors(self, layer: int) -> list[CanonicalTensor]:
        hf, trt = f"transformer.blocks.{layer}.", f"transformer.layers.{layer}."
        d, kv_rows = self.hidden_size, self.num_key_value_heads * self.head_size
        rule = self.shard_rule
        tensors = self._norm(hf + "norm_1", trt + "input_layernorm", d)
        tensors += self._linear(hf + "attn.Wqkv", trt + "attention.qkv", rule("attention.qkv.weight"),
                                rule("attention.qkv.bias"))
        if self.qk_layernorm:
            for hf_name, trt_name, size in (("q_ln", "q_layernorm", d), ("k_ln", "k_layernorm", kv_rows)):
                tensors += [
                    CanonicalTensor(f"{trt}attention.{trt_name}.weight", hf_get(f"{hf}attn.{hf_name}.weight"),
                                    REPLICATED),
                    CanonicalTensor(f"{trt}attention.{trt_name}.bias", _bias_or_zeros(f"{hf}attn.{hf_name}.bias",
                                                                                       size), REPLICATED)]
        tensors += self._linear(hf + "attn.out_proj", trt + "attention.dense", rule("attention.dense.weight"),
                                rule("attention.dense.bias"))
        tensors += self._norm(hf + "norm_2", trt + "post_layernorm", d)
        tensors += self._linear(hf + "ffn.up_proj", trt + "mlp.fc", rule("mlp.fc.weight"), rule("mlp.fc.bias"))
        tensors += self._linear(hf + "ffn.down_proj", trt + "mlp.proj", rule("mlp.proj.weight"),
                                rule("mlp.proj.bias"))
        return tensors

    def first_stage_tensors(self) -> list[CanonicalTensor]:
        tensors = [CanonicalTensor("transformer.vocab_embedding.weight", hf_get("transformer.wte.weight"),
                                   REPLICATED)]
        if self.learned_positions:
            tensors.append(CanonicalTensor("transformer.position_embedding.weight",
                                           hf_get("transformer.wpe.weight"), REPLICATED))
        return tensors

    def last_stage_tensors(self) -> list[CanonicalTensor]:
        tensors = self._norm("transformer.norm_f", "transformer.ln_f", self.hidden_size)
        tensors.append(CanonicalTensor("lm_head.weight", self._lm_head_source(), self.shard_rule("lm_head.weight")))
        return tensors

    def _lm_head_source(self) -> TensorSource:
        tied, scale = self.tied, self.logit_scale

        def read(checkpoint: HFCheckpoint) -> torch.Tensor:
            name = "transformer.wte.weight" if tied else self._untied_lm_head(checkpoint)
            assert name is not None
            weight = checkpoint.get(name)
            if scale is not None:  # logits = scale * (h @ W^T) = h @ (scale * W)^T
                weight = (weight.float() * scale).to(weight.dtype)
            return weight
        return read

    @classmethod
    def shard_rule(cls, name: str) -> ShardRule:
        return mpt_shard_rule(name)

    # --- other stages --------------------------------------------------------------------------------------

    @classmethod
    def check_trtllm_build(cls, config: dict[str, Any], mapping: Mapping) -> None:
        if config.get("bias"):
            raise ConfigError("bias: true (an MPT with no_bias false) is a gen-repo extension TensorRT-LLM's MPT "
                              "cannot load; use --engine pytorch")
        if config.get("qk_layernorm"):
            raise ConfigError("qk_layernorm: true (MPT attn_config.qk_ln) is not supported by TensorRT-LLM's "
                              "MPT; use --engine pytorch")
        if config.get("position_embedding_type", "alibi") != "alibi":
            raise ConfigError(f"position_embedding_type {config.get('position_embedding_type')!r}: "
                              "TensorRT-LLM's MPT only builds ALiBi models; use --engine pytorch")
        hidden = int(config["hidden_size"])
        intermediate = config.get("intermediate_size")
        if intermediate is not None and int(intermediate) != 4 * hidden:
            raise ConfigError(f"intermediate_size {intermediate} (MPT expansion_ratio "
                              f"{int(intermediate) / hidden:g} or ffn_config.ffn_hidden_size): TensorRT-LLM's MPT "
                              f"hard-codes an MLP of 4 x hidden_size ({4 * hidden}); use --engine pytorch")
        if mapping.pipeline_parallel_size > 1:
            raise ConfigError(f"mapping.pp_size {mapping.pipeline_parallel_size}: TensorRT-LLM's MPT has no "
                              "pipeline parallelism (its layers never pass hidden states between stages); "
                              "convert with --pp-size 1 or use --engine pytorch")
        epsilon = config.get("norm_epsilon")
        if epsilon is not None and float(epsilon) != 1e-5:
            # its final LayerNorm (ln_f) is built without eps, i.e. with 1e-5: a tiny numeric difference
            print(f"warning: norm_epsilon {epsilon}: TensorRT-LLM's MPT uses 1e-5 in its final LayerNorm (ln_f)",
                  file=sys.stderr)

    def calibration_model(self, model_dir: Path, trust_remote_code: bool) -> torch.nn.Module | None:
        """With the checkpoint's own code (llm-foundry), AutoModel; else transformers' MptForCausalLM (MHA only)
        holding the checkpoint's weights, GQA/MQA KV heads repeated.

        A query head h of llm-foundry's GQA attends KV head h // (heads / kv_heads); repeating each KV head that
        many times gives an MHA model with the same attention, and the repeated Wqkv rows do not change max |QKV|.
        """
        if trust_remote_code:
            return None
        from transformers import MptConfig, MptForCausalLM

        lacking = [feature for feature, present in (
            ("attn_config.qk_ln", self.qk_layernorm),
            ("learned positions (attn_config.alibi false)", self.learned_positions),
            ("biases (no_bias false)", self.bias),
            ("attn_config.alibi_bias_max other than 8", self.alibi_bias_max != 8),
            ("ffn sizes other than an integer expansion_ratio", self.intermediate_size % self.hidden_size),
        ) if present]
        if lacking:
            raise GenRepoError("INT8 KV calibration runs the model with transformers' MPT, which lacks "
                               f"{', '.join(lacking)}; pass --trust-remote-code to use the checkpoint's own code")
        d, heads, kv_heads, head_size = self.hidden_size, self.num_attention_heads, self.num_key_value_heads, \
            self.head_size
        config = MptConfig(d_model=d, n_heads=heads, n_layers=self.num_layers, max_seq_len=self.max_seq_len,
                           expansion_ratio=self.intermediate_size // d, vocab_size=self.vocab_size, no_bias=True,
                           layer_norm_epsilon=self.norm_epsilon, tie_word_embeddings=self.tied,
                           attn_config={"alibi": True, "alibi_bias_max": 8, "clip_qkv": self.clip_qkv,
                                        "attn_type": "multihead_attention"})
        with torch.device("meta"):
            model = MptForCausalLM(config)
        checkpoint = HFCheckpoint(model_dir)
        state = {}
        for name in checkpoint.names():
            tensor = checkpoint.get(name).float()
            if name.endswith("attn.Wqkv.weight") and kv_heads != heads:
                q, k, v = tensor.split([d, kv_heads * head_size, kv_heads * head_size])
                k, v = (part.view(kv_heads, head_size, d).repeat_interleave(heads // kv_heads, dim=0)
                        .reshape(d, d) for part in (k, v))
                tensor = torch.cat([q, k, v])
            state["lm_head.weight" if name.endswith("lm_head.weight") else name] = tensor
        if self.tied:
            state["lm_head.weight"] = state["transformer.wte.weight"]
        try:
            model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as error:
            raise GenRepoError(f"INT8 KV calibration cannot load {model_dir} into transformers' MPT: "
                               f"{error}") from error
        if self.tied:
            model.tie_weights()
        return model.eval()

    @classmethod
    def tiny_hf_model(cls, shape: TinyShape, **hf_overrides: Any) -> torch.nn.Module:
        from transformers import MptConfig, MptForCausalLM

        if shape.num_key_value_heads not in (None, shape.num_attention_heads):
            raise GenRepoError("transformers' MptForCausalLM is MHA only: a tiny MPT has as many KV heads as heads")
        intermediate = shape.intermediate_size or 4 * shape.hidden_size
        if intermediate % shape.hidden_size:
            raise GenRepoError(f"a tiny MPT's intermediate_size ({intermediate}) must be a multiple of its "
                               f"hidden_size ({shape.hidden_size}): transformers takes an expansion_ratio")
        fields = {
            "d_model": shape.hidden_size, "n_heads": shape.num_attention_heads, "n_layers": shape.num_hidden_layers,
            "expansion_ratio": intermediate // shape.hidden_size, "max_seq_len": shape.max_position_embeddings,
            "vocab_size": shape.vocab_size, "no_bias": True, "norm_type": "low_precision_layernorm",
            "attn_config": {"alibi": True, "alibi_bias_max": 8, "clip_qkv": shape.clip_qkv, "attn_impl": "torch"}}
        return MptForCausalLM(MptConfig(**merged_config(fields, hf_overrides)))


def mpt_shard_rule(name: str) -> ShardRule:
    """Tensor-parallel rule of a TensorRT-LLM MPT/DBRX dense tensor name."""
    if name == "lm_head.weight":
        return ShardRule("vocab")
    if name.endswith(("attention.qkv.weight", "attention.qkv.bias")):
        return ShardRule("qkv")
    if name.endswith(("attention.dense.weight", "mlp.proj.weight")):
        return ShardRule("split", 1)
    if name.endswith(("mlp.fc.weight", "mlp.fc.bias")):
        return ShardRule("split", 0)
    # norms, embeddings, dense/proj biases (added after the all-reduce), KV-cache scales
    return REPLICATED


def _bias_or_zeros(name: str, size: int) -> TensorSource:
    """The HF bias, or zeros of the model's dtype when the checkpoint has none (transformers' MPT norms)."""
    def read(checkpoint: HFCheckpoint) -> torch.Tensor:
        if name in checkpoint:
            return checkpoint.get(name)
        return torch.zeros(size, dtype=checkpoint.dtype("transformer.wte.weight"))
    return read
