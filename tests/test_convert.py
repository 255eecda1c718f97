"""HF -> TensorRT-LLM checkpoint conversion at TP1: config fields, tensor names, shapes, dtypes and values."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from generator.convert.job import ConvertSettings, convert_checkpoint
from generator.errors import GenRepoError
from generator.formats.hf_checkpoint import HFCheckpoint
from generator.formats.safetensors import SafetensorsWriter, read_safetensors_header


def convert(model_dir: Path, output_dir: Path, **kwargs: Any) -> Path:
    """`convert_checkpoint` with float32 and no progress bars unless given."""
    settings: dict[str, Any] = {"dtype": "float32", "progress": False, **kwargs}
    return convert_checkpoint(ConvertSettings(model_dir=model_dir, output_dir=output_dir, **settings))


def read_json(path: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(path.read_text())
    return result


def rank_tensors(checkpoint: Path, rank: int) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / f"rank{rank}.safetensors")


def write_variant(source: Path, target: Path, config_updates: dict[str, Any],
                  tensors: dict[str, torch.Tensor]) -> Path:
    """An HF checkpoint dir with `source`'s config updated (nested dicts merged one level) and `tensors`."""
    config = read_json(source / "config.json")
    for key, value in config_updates.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    target.mkdir(parents=True)
    (target / "config.json").write_text(json.dumps(config, indent=2))
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, target / "model.safetensors")
    return target


def make_gqa_mpt(mha_dir: Path, target: Path, kv_heads: int) -> Path:
    """A GQA (or MQA when kv_heads == 1) MPT made from an MHA one by keeping the first kv_heads K and V heads.

    transformers' MPT is MHA-only, so llm-foundry's GQA layout is written directly: Wqkv rows [Q; K; V] with
    K and V of kv_heads heads each.
    """
    config = read_json(mha_dir / "config.json")
    d, heads = config["d_model"], config["n_heads"]
    kv_rows = kv_heads * (d // heads)
    tensors = load_file(mha_dir / "model.safetensors")
    for name in list(tensors):
        if name.endswith("attn.Wqkv.weight"):
            q, k, v = tensors[name].split(d)
            tensors[name] = torch.cat([q, k[:kv_rows], v[:kv_rows]])
    attn_type = "multiquery_attention" if kv_heads == 1 else "grouped_query_attention"
    return write_variant(mha_dir, target, {"attn_config": {"attn_type": attn_type, "kv_n_heads": kv_heads}}, tensors)


def read_config(checkpoint: Path) -> dict[str, Any]:
    return read_json(checkpoint / "config.json")


def test_mpt_tp1_matches_hf(mpt_dir: Path, tmp_path: Path) -> None:
    out = convert(mpt_dir, tmp_path / "ckpt")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "rank0.safetensors"]
    config = read_config(out)
    assert config["architecture"] == "MPTForCausalLM"
    expected = {"dtype": "float32", "logits_dtype": "float32", "vocab_size": 512, "hidden_size": 64,
                "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 4, "position_embedding_type": "alibi", "hidden_act": "gelu",
                "max_position_embeddings": 128, "norm_epsilon": 1e-5, "use_parallel_embedding": False,
                "embedding_sharding_dim": 0, "bias": False, "clip_qkv": None, "alibi_bias_max": 8,
                "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
                "mapping": {"world_size": 1, "tp_size": 1, "pp_size": 1, "moe_tp_size": 1, "moe_ep_size": 1}}
    assert {key: config[key] for key in expected} == expected
    assert "gen_repo_extensions" not in config  # a standard checkpoint: only TensorRT-LLM's keys
    hf = load_file(mpt_dir / "model.safetensors")
    trt = load_file(out / "rank0.safetensors")
    pairs = {"transformer.vocab_embedding.weight": "transformer.wte.weight",
             "lm_head.weight": "transformer.wte.weight", "transformer.ln_f.weight": "transformer.norm_f.weight"}
    for layer in range(2):
        trt_prefix, hf_prefix = f"transformer.layers.{layer}.", f"transformer.blocks.{layer}."
        pairs.update({trt_prefix + "input_layernorm.weight": hf_prefix + "norm_1.weight",
                      trt_prefix + "attention.qkv.weight": hf_prefix + "attn.Wqkv.weight",
                      trt_prefix + "attention.dense.weight": hf_prefix + "attn.out_proj.weight",
                      trt_prefix + "post_layernorm.weight": hf_prefix + "norm_2.weight",
                      trt_prefix + "mlp.fc.weight": hf_prefix + "ffn.up_proj.weight",
                      trt_prefix + "mlp.proj.weight": hf_prefix + "ffn.down_proj.weight"})
    assert set(trt) == set(pairs)
    for trt_name, hf_name in pairs.items():
        assert torch.equal(trt[trt_name], hf[hf_name]), trt_name


def test_dbrx_tp1_matches_hf(dbrx_dir: Path, tmp_path: Path) -> None:
    out = convert(dbrx_dir, tmp_path / "ckpt")
    config = read_config(out)
    expected = {"architecture": "DbrxForCausalLM", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 96,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "position_embedding_type": "rope_gpt_neox", "hidden_act": "swiglu", "rotary_base": 500000.0,
                "rotary_scaling": None, "max_position_embeddings": 128, "norm_epsilon": 1e-5,
                "moe": {"num_experts": 4, "top_k": 2, "normalization_mode": 1}, "moe_normalize_expert_weights": 1.0,
                "clip_qkv": 8.0, "dense_context_fmha": False, "use_parallel_embedding": False,
                "embedding_sharding_dim": 0, "disable_weight_only_quant_plugin": False,
                "mapping": {"world_size": 1, "tp_size": 1, "pp_size": 1, "moe_tp_size": 1, "moe_ep_size": 1}}
    assert {key: config[key] for key in expected} == expected
    hf = load_file(dbrx_dir / "model.safetensors")
    trt = load_file(out / "rank0.safetensors")
    assert torch.equal(trt["lm_head.weight"], hf["lm_head.weight"])
    assert torch.equal(trt["transformer.vocab_embedding.weight"], hf["transformer.wte.weight"])
    for layer in range(2):
        t, h = f"transformer.layers.{layer}.", f"transformer.blocks.{layer}."
        assert torch.equal(trt[t + "attention.qkv.weight"], hf[h + "norm_attn_norm.attn.Wqkv.weight"])
        assert torch.equal(trt[t + "input_layernorm.weight"], hf[h + "norm_attn_norm.norm_1.weight"])
        assert trt[t + "mlp.router.weight"].dtype == torch.float32
        fc, proj = trt[t + "mlp.fc.weight"], trt[t + "mlp.proj.weight"]
        assert fc.shape == (4, 192, 64) and proj.shape == (4, 64, 96)
        for expert in range(4):
            rows = slice(expert * 96, (expert + 1) * 96)
            assert torch.equal(fc[expert, :96], hf[h + "ffn.experts.mlp.v1"][rows])  # up first
            assert torch.equal(fc[expert, 96:], hf[h + "ffn.experts.mlp.w1"][rows])  # gate second
            assert torch.equal(proj[expert], hf[h + "ffn.experts.mlp.w2"][rows].T)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_dtypes(mpt_dir: Path, dbrx_dir: Path, tmp_path: Path, dtype: str) -> None:
    torch_dtype = getattr(torch, dtype)
    for model_dir in (mpt_dir, dbrx_dir):
        out = convert(model_dir, tmp_path / model_dir.name, dtype=dtype)
        assert read_config(out)["dtype"] == dtype
        hf = load_file(model_dir / "model.safetensors")
        for name, tensor in load_file(out / "rank0.safetensors").items():
            assert tensor.dtype == (torch.float32 if name.endswith("router.weight") else torch_dtype), name
        assert torch.equal(load_file(out / "rank0.safetensors")["transformer.vocab_embedding.weight"],
                           hf["transformer.wte.weight"].to(torch_dtype))


def test_replaces_previous_checkpoint(mpt_dir: Path, tmp_path: Path) -> None:
    out = convert(mpt_dir, tmp_path / "ckpt", tensor_parallel_size=2)
    out = convert(mpt_dir, tmp_path / "ckpt")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "rank0.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_refuses_to_replace_other_directory(mpt_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "notes.txt").write_text("mine")
    with pytest.raises(GenRepoError, match="not a TensorRT-LLM checkpoint"):
        convert(mpt_dir, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "notes.txt").read_text() == "mine"


def _sharded_copy(model_dir: Path, out_dir: Path) -> Path:
    """The same weights as two shards with an index, as large HF checkpoints are saved."""
    out_dir.mkdir()
    (out_dir / "config.json").write_text((model_dir / "config.json").read_text())
    tensors = load_file(model_dir / "model.safetensors")
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for file_name, part in halves.items():
        save_file({name: tensors[name] for name in part}, out_dir / file_name)
        weight_map.update(dict.fromkeys(part, file_name))
    (out_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out_dir


def test_sharded_and_bin_checkpoints_convert_identically(mpt_dir: Path, tmp_path: Path) -> None:
    reference = load_file(convert(mpt_dir, tmp_path / "ref") / "rank0.safetensors")
    sharded = _sharded_copy(mpt_dir, tmp_path / "sharded")
    assert load_file(convert(sharded, tmp_path / "a") / "rank0.safetensors").keys() == reference.keys()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((mpt_dir / "config.json").read_text())
    torch.save(load_file(mpt_dir / "model.safetensors"), bin_dir / "pytorch_model.bin")
    converted = load_file(convert(bin_dir, tmp_path / "b") / "rank0.safetensors")
    assert converted.keys() == reference.keys()
    assert all(torch.equal(converted[name], reference[name]) for name in reference)


def test_legacy_bin_checkpoint(mpt_dir: Path, tmp_path: Path) -> None:
    """torch.save's pre-zip format cannot be memory-mapped; it is read whole instead."""
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text((mpt_dir / "config.json").read_text())
    torch.save(load_file(mpt_dir / "model.safetensors"), legacy / "pytorch_model.bin",
               _use_new_zipfile_serialization=False)
    reference = load_file(convert(mpt_dir, tmp_path / "ref") / "rank0.safetensors")
    converted = load_file(convert(legacy, tmp_path / "out") / "rank0.safetensors")
    assert converted.keys() == reference.keys()
    assert all(torch.equal(converted[name], reference[name]) for name in reference)


def test_missing_weight_file_fails_and_writes_nothing(mpt_dir: Path, tmp_path: Path) -> None:
    sharded = _sharded_copy(mpt_dir, tmp_path / "sharded")
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(GenRepoError, match="missing.*model-00002-of-00002.safetensors"):
        convert(sharded, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sharded"]


def test_truncated_weight_file_fails_and_writes_nothing(mpt_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((mpt_dir / "config.json").read_text())
    data = (mpt_dir / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(GenRepoError, match="truncated"):
        convert(broken, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


def test_truncated_bin_file_fails(mpt_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((mpt_dir / "config.json").read_text())
    torch.save(load_file(mpt_dir / "model.safetensors"), broken / "pytorch_model.bin")
    data = (broken / "pytorch_model.bin").read_bytes()
    (broken / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(GenRepoError, match="truncated or corrupt"):
        convert(broken, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


def test_unknown_tensor_fails(mpt_dir: Path, tmp_path: Path) -> None:
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "config.json").write_text((mpt_dir / "config.json").read_text())
    tensors = load_file(mpt_dir / "model.safetensors")
    tensors["transformer.blocks.0.attn.rotary.inv_freq"] = torch.ones(4)
    save_file(tensors, extra / "model.safetensors")
    with pytest.raises(GenRepoError, match="does not know.*inv_freq"):
        convert(extra, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_written_files_are_valid_safetensors(dbrx_dir: Path, tmp_path: Path) -> None:
    out = convert(dbrx_dir, tmp_path / "ckpt", dtype="float16", int8_kv_cache=False)
    with safe_open(str(out / "rank0.safetensors"), framework="pt") as handle:
        names = list(handle.keys())
        assert all(handle.get_tensor(name).is_contiguous() for name in names)
    assert math.isclose(read_config(out)["rotary_base"], 500000.0)


@pytest.mark.parametrize("workers", [1, 2])
def test_failure_mid_conversion_keeps_previous_output(mpt_dir: Path, tmp_path: Path, workers: int,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    previous = convert(mpt_dir, tmp_path / "ckpt")
    before = (previous / "rank0.safetensors").read_bytes()
    calls = {"count": 0}
    original_get = HFCheckpoint.get

    def failing_get(self: HFCheckpoint, name: str) -> torch.Tensor:
        calls["count"] += 1
        if calls["count"] == 12:
            raise GenRepoError(f"cannot read tensor {name}: disk error")
        return original_get(self, name)

    monkeypatch.setattr(HFCheckpoint, "get", failing_get)
    with pytest.raises(GenRepoError, match="disk error"):
        convert(mpt_dir, tmp_path / "ckpt", tensor_parallel_size=2, workers=workers)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no staging directory left behind
    assert sorted(p.name for p in previous.iterdir()) == ["config.json", "rank0.safetensors"]
    assert (previous / "rank0.safetensors").read_bytes() == before


@pytest.mark.parametrize("reserve", [8, 4096])
def test_safetensors_writer(tmp_path: Path, reserve: int) -> None:
    """Readable by safetensors whether the header fits its reservation or forces a rewrite; odd-sized
    tensors are moved to the end so every tensor stays aligned."""
    tensors = {"a.scale": torch.tensor([0.5]), "b.weight": torch.randn(4, 6).to(torch.bfloat16),
               "c.int4": torch.arange(-3, 4, dtype=torch.int8), "d.half": torch.randn(3).half(),
               "e.weight": torch.randn(2, 2, 2)}
    with SafetensorsWriter(tmp_path / "x.safetensors", header_reserve=reserve) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
    loaded = load_file(tmp_path / "x.safetensors")
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in tensors.items())
    header = read_safetensors_header(tmp_path / "x.safetensors")
    for entry in header.values():
        size = {"F32": 4, "BF16": 2, "F16": 2, "I8": 1}[entry["dtype"]]
        assert entry["data_offsets"][0] % size == 0
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]
