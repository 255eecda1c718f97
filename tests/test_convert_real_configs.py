"""The published configs of MPT-7B, MPT-30B, Replit Code v1.5 3B and DBRX convert with the right shapes.

Full-size shapes are checked on meta tensors (the converter's own name map and shard rules, no data); an actual
conversion runs on the same configs with 2 layers and d_model shrunk to head size 8 (real head counts, KV heads,
vocabularies, expert counts).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from generator.convert.models import spec_for
from generator.convert.models.base import shard_tensor
from generator.formats.dtypes import stored_dtype
from generator.formats.mapping import Mapping
from tests.test_convert import convert, rank_tensors, read_config

MPT_7B: dict[str, Any] = {
    "architectures": ["MPTForCausalLM"], "model_type": "mpt", "d_model": 4096, "n_heads": 32, "n_layers": 32,
    "expansion_ratio": 4, "max_seq_len": 2048, "vocab_size": 50432, "no_bias": True, "learned_pos_emb": True,
    "logit_scale": None, "embedding_fraction": 1.0, "norm_type": "low_precision_layernorm", "emb_pdrop": 0,
    "resid_pdrop": 0, "init_device": "cpu", "torch_dtype": "bfloat16", "use_cache": False, "verbose": 0,
    "attn_config": {"alibi": True, "alibi_bias_max": 8, "attn_impl": "torch", "attn_pdrop": 0,
                    "attn_type": "multihead_attention", "attn_uses_sequence_id": False, "clip_qkv": None,
                    "prefix_lm": False, "qk_ln": False, "softmax_scale": None},
    "auto_map": {"AutoConfig": "configuration_mpt.MPTConfig", "AutoModelForCausalLM": "modeling_mpt.MPTForCausalLM"},
    "tokenizer_name": "EleutherAI/gpt-neox-20b",
}
MPT_30B: dict[str, Any] = {**MPT_7B, "d_model": 7168, "n_heads": 64, "n_layers": 48, "max_seq_len": 8192,
                           "fc_type": "torch", "ffn_config": {"ffn_type": "mptmlp"}}
REPLIT_V1_5: dict[str, Any] = {
    **MPT_7B, "d_model": 3072, "n_heads": 24, "n_layers": 32, "max_seq_len": 4096, "vocab_size": 32768,
    "attn_config": {**MPT_7B["attn_config"], "attn_impl": "triton", "attn_type": "grouped_query_attention",
                    "kv_n_heads": 8},
}
DBRX: dict[str, Any] = {
    "architectures": ["DbrxForCausalLM"], "model_type": "dbrx", "d_model": 6144, "n_heads": 48, "n_layers": 40,
    "max_seq_len": 32768, "vocab_size": 100352, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "attn_config": {"clip_qkv": 8, "kv_n_heads": 8, "rope_theta": 500000, "attn_pdrop": 0, "model_type": ""},
    "ffn_config": {"ffn_act_fn": {"name": "silu"}, "ffn_hidden_size": 10752, "moe_num_experts": 16, "moe_top_k": 4,
                   "moe_jitter_eps": 0, "moe_loss_weight": 0.05, "moe_normalize_expert_weights": 1,
                   "uniform_expert_assignment": False, "model_type": ""},
    "router_aux_loss_coef": 0.05, "output_router_logits": False, "resid_pdrop": 0.0, "emb_pdrop": 0.0,
}


class MetaCheckpoint:
    """Stands in for `HFCheckpoint`: every expected tensor as a bf16 meta tensor (shapes only)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]) -> None:
        self.shapes = shapes

    def get(self, name: str) -> torch.Tensor:
        return torch.empty(self.shapes[name], dtype=torch.bfloat16, device="meta")

    def dtype(self, name: str) -> torch.dtype:
        return torch.bfloat16

    def __contains__(self, name: object) -> bool:
        return name in self.shapes


def planned_shapes(config: dict[str, Any], mapping: Mapping) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of one rank of a bf16 conversion, computed on meta tensors."""
    spec = spec_for(config)
    spec.check_mapping(mapping)
    checkpoint = MetaCheckpoint(spec.expected_hf_tensors())
    result = {}
    for name, tensor in spec.rank_tensors(mapping):
        shard = shard_tensor(tensor.source(checkpoint), tensor.rule, spec.shard_layout(), mapping)  # type: ignore[arg-type]
        result[name] = (tuple(shard.shape), stored_dtype(name, torch.bfloat16))
    return result


def layer_shapes(plan: dict[str, tuple[tuple[int, ...], torch.dtype]], layer: int = 0) -> dict[str, tuple[int, ...]]:
    prefix = f"transformer.layers.{layer}."
    return {name.removeprefix(prefix): shape for name, (shape, _) in plan.items() if name.startswith(prefix)}


def test_mpt_7b_tp1_shapes() -> None:
    plan = planned_shapes({**MPT_7B, "n_layers": 2}, Mapping())
    assert plan["transformer.vocab_embedding.weight"][0] == (50432, 4096)
    assert plan["lm_head.weight"][0] == (50432, 4096)
    assert layer_shapes(plan) == {"input_layernorm.weight": (4096,), "attention.qkv.weight": (12288, 4096),
                                  "attention.dense.weight": (4096, 4096), "post_layernorm.weight": (4096,),
                                  "mlp.fc.weight": (16384, 4096), "mlp.proj.weight": (4096, 16384)}


def test_mpt_30b_tp4_pp2_shapes() -> None:
    mapping = Mapping.create(4, 2, rank=7)
    plan = planned_shapes(MPT_30B, mapping)
    assert len(layer_shapes(plan, 23)) == 6 and not layer_shapes(plan, 24)  # 48 layers -> 24 per stage
    assert layer_shapes(plan)["attention.qkv.weight"] == (3 * 7168 // 4, 7168)
    assert layer_shapes(plan)["attention.dense.weight"] == (7168, 1792)
    assert layer_shapes(plan)["mlp.fc.weight"] == (7168, 7168)
    assert plan["lm_head.weight"][0] == (12608, 7168)
    assert "transformer.vocab_embedding.weight" not in plan


def test_replit_tp2_shapes_and_weight_bytes() -> None:
    plan = planned_shapes(REPLIT_V1_5, Mapping.create(2, rank=1))
    assert layer_shapes(plan) == {"input_layernorm.weight": (3072,), "attention.qkv.weight": (2560, 3072),
                                  "attention.dense.weight": (3072, 1536), "post_layernorm.weight": (3072,),
                                  "mlp.fc.weight": (6144, 3072), "mlp.proj.weight": (3072, 6144)}
    assert plan["lm_head.weight"][0] == (16384, 3072)
    assert plan["transformer.vocab_embedding.weight"][0] == (32768, 3072)
    total = sum(2 * torch.Size(shape).numel() for shape, _ in plan.values())
    assert total == 3_523_614_720  # TensorRT-LLM's Replit bf16 TP2 build log: 3,523,622,456 B incl. extras


def test_dbrx_tp8_and_ep8_shapes() -> None:
    plan = planned_shapes({**DBRX, "n_layers": 2}, Mapping.create(8, rank=3))
    shapes = layer_shapes(plan)
    assert shapes["attention.qkv.weight"] == (1024, 6144)
    assert shapes["attention.dense.weight"] == (6144, 768)
    assert shapes["mlp.router.weight"] == (16, 6144)
    assert plan["transformer.layers.0.mlp.router.weight"][1] == torch.float32
    assert shapes["mlp.fc.weight"] == (16, 2688, 6144)
    assert shapes["mlp.proj.weight"] == (16, 6144, 1344)
    assert plan["lm_head.weight"][0] == (12544, 6144)
    assert plan["transformer.vocab_embedding.weight"][0] == (100352, 6144)
    expert_parallel = layer_shapes(planned_shapes({**DBRX, "n_layers": 2}, Mapping.create(8, 1, 1, 8, rank=5)))
    assert expert_parallel["mlp.fc.weight"] == (2, 21504, 6144)
    assert expert_parallel["mlp.proj.weight"] == (2, 6144, 10752)


def _shrunk(config: dict[str, Any]) -> dict[str, Any]:
    """2 layers, head size 8 (hidden and FFN sizes scaled alike); head counts and vocabulary stay real."""
    shrunk = copy.deepcopy(config)
    scale = 8 * config["n_heads"] / config["d_model"]
    shrunk.update(n_layers=2, d_model=8 * config["n_heads"])
    if "ffn_config" in shrunk and "ffn_hidden_size" in shrunk["ffn_config"]:
        shrunk["ffn_config"]["ffn_hidden_size"] = int(config["ffn_config"]["ffn_hidden_size"] * scale)
    return shrunk


def _write_random_checkpoint(config: dict[str, Any], model_dir: Path) -> None:
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(config))
    generator = torch.Generator().manual_seed(0)
    tensors = {name: torch.randn(shape, generator=generator).to(torch.bfloat16)
               for name, shape in spec_for(config).expected_hf_tensors().items()}
    save_file(tensors, model_dir / "model.safetensors")


@pytest.mark.parametrize(("config", "layout"), [
    (MPT_7B, {"tensor_parallel_size": 2}),
    (MPT_30B, {"tensor_parallel_size": 4}),
    (REPLIT_V1_5, {"tensor_parallel_size": 2, "pipeline_parallel_size": 2}),
    (DBRX, {"tensor_parallel_size": 4, "moe_expert_parallel_size": 2}),
], ids=["mpt-7b", "mpt-30b", "replit-v1.5", "dbrx"])
def test_real_configs_convert(tmp_path: Path, config: dict[str, Any], layout: dict[str, int]) -> None:
    shrunk = _shrunk(config)
    _write_random_checkpoint(shrunk, tmp_path / "hf")
    out = convert(tmp_path / "hf", tmp_path / "ckpt", dtype="auto", workers=2, **layout)
    written = read_config(out)
    assert written["dtype"] == "bfloat16"
    assert written["vocab_size"] == config["vocab_size"]
    assert written["num_attention_heads"] == config["n_heads"]
    assert written["num_key_value_heads"] == config["attn_config"].get("kv_n_heads", config["n_heads"])
    assert written["max_position_embeddings"] == config["max_seq_len"]
    world = layout.get("tensor_parallel_size", 1) * layout.get("pipeline_parallel_size", 1)
    for rank in range(world):
        mapping = Mapping.create(layout.get("tensor_parallel_size", 1), layout.get("pipeline_parallel_size", 1),
                                 None, layout.get("moe_expert_parallel_size"), rank=rank)
        expected = planned_shapes(shrunk, mapping)
        actual = rank_tensors(out, rank)
        assert {name: (tuple(t.shape), t.dtype) for name, t in actual.items()} == expected
