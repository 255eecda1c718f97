"""MPT variants (biases, qk LayerNorm, learned positions, logit_scale), DBRX routing options, unsupported fields."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from generator.convert.inspect import unshard_checkpoint
from generator.convert.models import spec_for
from generator.errors import ConfigError
from tests.factories import make_mpt
from tests.test_convert import convert, make_gqa_mpt, rank_tensors, read_config, write_variant


def _random(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _with_biases(mpt_dir: Path, target: Path, norm_biases: bool = True) -> Path:
    """llm-foundry's no_bias=false layout: every Linear and (optionally) every LayerNorm has a bias."""
    tensors = load_file(mpt_dir / "model.safetensors")
    sizes = {"attn.Wqkv": 192, "attn.out_proj": 64, "ffn.up_proj": 256, "ffn.down_proj": 64}
    if norm_biases:
        sizes.update({"norm_1": 64, "norm_2": 64})
        tensors["transformer.norm_f.bias"] = _random(64, seed=99)
    for layer in range(2):
        for index, (module, size) in enumerate(sizes.items()):
            tensors[f"transformer.blocks.{layer}.{module}.bias"] = _random(size, seed=10 * layer + index)
    return write_variant(mpt_dir, target, {"no_bias": False}, tensors)


def test_mpt_biases_split_like_their_weights(mpt_dir: Path, tmp_path: Path) -> None:
    model = _with_biases(mpt_dir, tmp_path / "hf")
    hf = load_file(model / "model.safetensors")
    out = convert(model, tmp_path / "ckpt", tensor_parallel_size=2)
    assert read_config(out)["bias"] is True
    assert read_config(out)["gen_repo_extensions"] == ["bias"]
    for rank in range(2):
        trt = rank_tensors(out, rank)
        q, k, v = hf["transformer.blocks.1.attn.Wqkv.bias"].split(64)
        half = slice(32 * rank, 32 * (rank + 1))
        assert torch.equal(trt["transformer.layers.1.attention.qkv.bias"], torch.cat([q[half], k[half], v[half]]))
        # row-parallel biases are whole on every rank: the engine adds them once, after the all-reduce
        assert torch.equal(trt["transformer.layers.1.attention.dense.bias"], hf["transformer.blocks.1.attn.out_proj.bias"])
        assert torch.equal(trt["transformer.layers.1.mlp.proj.bias"], hf["transformer.blocks.1.ffn.down_proj.bias"])
        assert torch.equal(trt["transformer.layers.1.mlp.fc.bias"],
                           hf["transformer.blocks.1.ffn.up_proj.bias"][128 * rank:128 * (rank + 1)])
        assert torch.equal(trt["transformer.layers.1.input_layernorm.bias"], hf["transformer.blocks.1.norm_1.bias"])
        assert torch.equal(trt["transformer.layers.1.post_layernorm.bias"], hf["transformer.blocks.1.norm_2.bias"])
        assert torch.equal(trt["transformer.ln_f.bias"], hf["transformer.norm_f.bias"])
    reference = rank_tensors(convert(model, tmp_path / "tp1"), 0)
    merged = rank_tensors(unshard_checkpoint(out, tmp_path / "merged"), 0)
    assert merged.keys() == reference.keys() and all(torch.equal(merged[n], reference[n]) for n in reference)


def test_mpt_missing_norm_biases_become_zeros(mpt_dir: Path, tmp_path: Path) -> None:
    out = convert(_with_biases(mpt_dir, tmp_path / "hf", norm_biases=False), tmp_path / "ckpt")
    trt = rank_tensors(out, 0)
    assert torch.count_nonzero(trt["transformer.layers.0.input_layernorm.bias"]) == 0
    assert trt["transformer.ln_f.bias"].shape == (64,)


def test_transformers_mpt_with_no_bias_false_has_no_biases(tmp_path: Path) -> None:
    # transformers' MptForCausalLM ignores no_bias: it saves no bias tensors, and computes without them
    model = make_mpt(tmp_path / "hf", no_bias=False)
    out = convert(model, tmp_path / "ckpt")
    assert read_config(out)["bias"] is False
    assert not any(name.endswith(".bias") for name in rank_tensors(out, 0))


def test_mpt_qk_layernorm(mpt_dir: Path, tmp_path: Path) -> None:
    gqa = make_gqa_mpt(mpt_dir, tmp_path / "gqa", 2)
    tensors = load_file(gqa / "model.safetensors")
    for layer in range(2):
        tensors[f"transformer.blocks.{layer}.attn.q_ln.weight"] = 1 + 0.1 * _random(64, seed=layer)
        tensors[f"transformer.blocks.{layer}.attn.k_ln.weight"] = 1 + 0.1 * _random(32, seed=layer + 5)
    model = write_variant(gqa, tmp_path / "hf", {"attn_config": {"qk_ln": True}}, tensors)
    out = convert(model, tmp_path / "ckpt")
    assert read_config(out)["qk_layernorm"] is True
    assert read_config(out)["gen_repo_extensions"] == ["qk_layernorm"]
    trt = rank_tensors(out, 0)
    assert torch.equal(trt["transformer.layers.1.attention.q_layernorm.weight"],
                       tensors["transformer.blocks.1.attn.q_ln.weight"])
    assert torch.equal(trt["transformer.layers.1.attention.k_layernorm.weight"],
                       tensors["transformer.blocks.1.attn.k_ln.weight"])
    assert trt["transformer.layers.1.attention.k_layernorm.bias"].shape == (32,)
    assert torch.count_nonzero(trt["transformer.layers.1.attention.q_layernorm.bias"]) == 0


def test_mpt_learned_positions(mpt_dir: Path, tmp_path: Path) -> None:
    tensors = load_file(mpt_dir / "model.safetensors")
    tensors["transformer.wpe.weight"] = _random(128, 64, seed=3)
    model = write_variant(mpt_dir, tmp_path / "hf", {"attn_config": {"alibi": False}, "learned_pos_emb": True},
                          tensors)
    out = convert(model, tmp_path / "ckpt", pipeline_parallel_size=2)
    assert read_config(out)["position_embedding_type"] == "learned_absolute"
    assert torch.equal(rank_tensors(out, 0)["transformer.position_embedding.weight"], tensors["transformer.wpe.weight"])
    assert "transformer.position_embedding.weight" not in rank_tensors(out, 1)


@pytest.mark.parametrize("logit_scale", [0.25, "inv_sqrt_d_model"])
def test_mpt_logit_scale_folded_into_lm_head(mpt_dir: Path, tmp_path: Path, logit_scale: Any) -> None:
    tensors = load_file(mpt_dir / "model.safetensors")
    model = write_variant(mpt_dir, tmp_path / "hf", {"logit_scale": logit_scale}, tensors)
    trt = rank_tensors(convert(model, tmp_path / "ckpt"), 0)
    scale = 0.25 if logit_scale == 0.25 else 1 / math.sqrt(64)
    assert torch.allclose(trt["lm_head.weight"], tensors["transformer.wte.weight"] * scale)
    assert torch.equal(trt["transformer.vocab_embedding.weight"], tensors["transformer.wte.weight"])
    assert "logit_scale" not in read_config(tmp_path / "ckpt")


def test_mpt_untied_lm_head(mpt_dir: Path, tmp_path: Path) -> None:
    tensors = load_file(mpt_dir / "model.safetensors")
    tensors["transformer.lm_head.weight"] = _random(512, 64, seed=7)
    model = write_variant(mpt_dir, tmp_path / "hf", {"tie_word_embeddings": False}, tensors)
    assert torch.equal(rank_tensors(convert(model, tmp_path / "ckpt"), 0)["lm_head.weight"],
                       tensors["transformer.lm_head.weight"])


BASE_MPT = {"model_type": "mpt", "d_model": 64, "n_heads": 4, "n_layers": 2, "vocab_size": 512, "max_seq_len": 128}


@pytest.mark.parametrize(("update", "field"), [
    ({"attn_config": {"softmax_scale": 0.1}}, "attn_config.softmax_scale"),
    ({"attn_config": {"prefix_lm": True}}, "attn_config.prefix_lm"),
    ({"attn_config": {"attn_uses_sequence_id": True}}, "attn_config.attn_uses_sequence_id"),
    ({"attn_config": {"alibi": False}, "learned_pos_emb": False}, "learned_pos_emb"),
    ({"embedding_fraction": 0.5}, "embedding_fraction"),
    ({"norm_type": "rmsnorm"}, "norm_type"),
    ({"ffn_config": {"ffn_type": "mptglu"}}, "ffn_config.ffn_type"),
    ({"ffn_config": {"ffn_type": "te_ln_mlp"}}, "ffn_config.ffn_type"),
    ({"ffn_config": {"ffn_act_fn": {"name": "silu"}}}, "ffn_config.ffn_act_fn"),
    ({"attn_config": {"attn_type": "sliding"}}, "attn_config.attn_type"),
    ({"logit_scale": "sqrt"}, "logit_scale"),
])
def test_unsupported_mpt_fields_named(tmp_path: Path, update: dict[str, Any], field: str) -> None:
    model_dir = tmp_path / "hf"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({**BASE_MPT, **update}))
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        convert(model_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_model_type() -> None:
    with pytest.raises(ConfigError, match="unsupported model: model_type 'llama'"):
        spec_for({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})


@pytest.mark.parametrize(("normalize", "mode"), [(None, 0), (1, 1), (2.0, 1)])
def test_dbrx_expert_weight_normalization(dbrx_dir: Path, tmp_path: Path, normalize: Any, mode: int) -> None:
    tensors = load_file(dbrx_dir / "model.safetensors")
    model = write_variant(dbrx_dir, tmp_path / "hf", {"ffn_config": {"moe_normalize_expert_weights": normalize}},
                          tensors)
    config = read_config(convert(model, tmp_path / "ckpt"))
    assert config["moe"]["normalization_mode"] == mode
    assert config["moe_normalize_expert_weights"] == normalize
    assert config.get("gen_repo_extensions") == (["moe_normalize_expert_weights=2.0"] if normalize == 2.0 else None)


def test_dbrx_rope_theta_default(dbrx_dir: Path, tmp_path: Path) -> None:
    config = json.loads((dbrx_dir / "config.json").read_text())
    del config["attn_config"]["rope_theta"]
    spec = spec_for(config)
    from generator.formats.mapping import Mapping

    trt = spec.trtllm_config(Mapping(), "float16", {"quant_algo": None, "kv_cache_quant_algo": None})
    assert trt["rotary_base"] == 10000.0
    assert trt["position_embedding_type"] == "rope_gpt_neox"
