"""Tensor, pipeline and expert-parallel layouts: what each rank holds, and layouts rejected before any work."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from generator.cli import main
from generator.errors import ConfigError
from tests.convert.test_convert import convert, make_gqa_mpt, rank_tensors, read_config
from tests.factories import make_dbrx, make_mpt

HEAD = 16  # head size of the factories' tiny models (d_model 64, 4 heads)


@pytest.fixture(scope="module")
def mpt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_mpt(tmp_path_factory.mktemp("hf") / "mpt", vocab_size=510)


@pytest.fixture(scope="module")
def dbrx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dbrx(tmp_path_factory.mktemp("hf") / "dbrx", n_layers=3)


def heads(tensor: torch.Tensor, first: int, count: int) -> torch.Tensor:
    return tensor[first * HEAD:(first + count) * HEAD]


def test_mpt_tp2_rank_contents(mpt_dir: Path, tmp_path: Path) -> None:
    out = convert(mpt_dir, tmp_path / "ckpt", tensor_parallel_size=2)
    config = read_config(out)
    assert config["mapping"] == {"world_size": 2, "tp_size": 2, "pp_size": 1, "moe_tp_size": 2, "moe_ep_size": 1}
    assert config["vocab_size"] == 510
    hf = load_file(mpt_dir / "model.safetensors")
    for rank in range(2):
        trt = rank_tensors(out, rank)
        wqkv = hf["transformer.blocks.1.attn.Wqkv.weight"]
        q, k, v = wqkv.split(64)
        assert torch.equal(trt["transformer.layers.1.attention.qkv.weight"],
                           torch.cat([heads(q, 2 * rank, 2), heads(k, 2 * rank, 2), heads(v, 2 * rank, 2)]))
        cols, rows = slice(32 * rank, 32 * (rank + 1)), slice(128 * rank, 128 * (rank + 1))
        assert torch.equal(trt["transformer.layers.1.attention.dense.weight"],
                           hf["transformer.blocks.1.attn.out_proj.weight"][:, cols])
        assert torch.equal(trt["transformer.layers.1.mlp.fc.weight"], hf["transformer.blocks.1.ffn.up_proj.weight"][rows])
        assert torch.equal(trt["transformer.layers.1.mlp.proj.weight"],
                           hf["transformer.blocks.1.ffn.down_proj.weight"][:, rows])
        assert torch.equal(trt["transformer.vocab_embedding.weight"], hf["transformer.wte.weight"])
        assert torch.equal(trt["lm_head.weight"], hf["transformer.wte.weight"][255 * rank:255 * (rank + 1)])


def test_lm_head_padded_to_multiple_of_tp(mpt_dir: Path, tmp_path: Path) -> None:
    out = convert(mpt_dir, tmp_path / "ckpt", tensor_parallel_size=4)
    wte = load_file(mpt_dir / "model.safetensors")["transformer.wte.weight"]
    shards = [rank_tensors(out, rank)["lm_head.weight"] for rank in range(4)]
    assert [tuple(s.shape) for s in shards] == [(128, 64)] * 4
    assert torch.equal(torch.cat(shards)[:510], wte)
    assert torch.count_nonzero(shards[3][126:]) == 0
    assert read_config(out)["vocab_size"] == 510


@pytest.mark.parametrize(("kv_heads", "tp"), [(1, 2), (2, 4), (2, 2)])
def test_kv_heads_repeated_when_tp_exceeds_them(mpt_dir: Path, tmp_path: Path, kv_heads: int, tp: int) -> None:
    model = make_gqa_mpt(mpt_dir, tmp_path / "hf", kv_heads)
    out = convert(model, tmp_path / "ckpt", tensor_parallel_size=tp)
    assert read_config(out)["num_key_value_heads"] == kv_heads
    q, k, v = load_file(model / "model.safetensors")["transformer.blocks.0.attn.Wqkv.weight"].split(
        [64, kv_heads * HEAD, kv_heads * HEAD])
    q_per_rank, kv_per_rank = 4 // tp, max(1, kv_heads // tp)
    for rank in range(tp):
        kv_head = rank // (tp // kv_heads) if tp > kv_heads else rank * kv_per_rank
        expected = torch.cat([heads(q, rank * q_per_rank, q_per_rank), heads(k, kv_head, kv_per_rank),
                              heads(v, kv_head, kv_per_rank)])
        assert torch.equal(rank_tensors(out, rank)["transformer.layers.0.attention.qkv.weight"], expected)


def test_pipeline_stages_renumber_layers(dbrx_dir: Path, tmp_path: Path) -> None:
    out = convert(dbrx_dir, tmp_path / "ckpt", pipeline_parallel_size=2)
    hf = load_file(dbrx_dir / "model.safetensors")
    first, last = rank_tensors(out, 0), rank_tensors(out, 1)
    assert "transformer.vocab_embedding.weight" in first and "lm_head.weight" not in first
    assert "transformer.ln_f.weight" not in first
    assert {name.split(".")[2] for name in first if name.startswith("transformer.layers.")} == {"0", "1"}
    assert "transformer.vocab_embedding.weight" not in last
    assert {"lm_head.weight", "transformer.ln_f.weight"} <= set(last)
    assert {name.split(".")[2] for name in last if name.startswith("transformer.layers.")} == {"0"}
    assert torch.equal(last["transformer.layers.0.attention.qkv.weight"],
                       hf["transformer.blocks.2.norm_attn_norm.attn.Wqkv.weight"])


@pytest.mark.parametrize(("moe_tp", "moe_ep"), [(2, 2), (1, 4), (4, 1)])
def test_dbrx_expert_and_moe_tensor_parallel(dbrx_dir: Path, tmp_path: Path, moe_tp: int, moe_ep: int) -> None:
    out = convert(dbrx_dir, tmp_path / "ckpt", tensor_parallel_size=4, moe_tensor_parallel_size=moe_tp,
                  moe_expert_parallel_size=moe_ep, workers=2)
    assert read_config(out)["mapping"]["moe_tp_size"] == moe_tp
    assert read_config(out)["mapping"]["moe_ep_size"] == moe_ep
    hf = load_file(dbrx_dir / "model.safetensors")
    shape = (4, 96, 64)
    up, gate = hf["transformer.blocks.0.ffn.experts.mlp.v1"].view(shape), hf["transformer.blocks.0.ffn.experts.mlp.w1"].view(shape)
    down = hf["transformer.blocks.0.ffn.experts.mlp.w2"].view(shape)
    experts, width = 4 // moe_ep, 96 // moe_tp
    for rank in range(4):
        ep_rank, tp_rank = rank % moe_ep, rank // moe_ep
        e, f = slice(ep_rank * experts, (ep_rank + 1) * experts), slice(tp_rank * width, (tp_rank + 1) * width)
        trt = rank_tensors(out, rank)
        assert torch.equal(trt["transformer.layers.0.mlp.fc.weight"], torch.cat([up[e, f], gate[e, f]], dim=1))
        assert torch.equal(trt["transformer.layers.0.mlp.proj.weight"], down[e, f].transpose(1, 2))
        assert torch.equal(trt["transformer.layers.0.mlp.router.weight"], hf["transformer.blocks.0.ffn.router.layer.weight"])
        # kv_n_heads 2 < tp 4: each rank holds one KV head
        assert trt["transformer.layers.0.attention.qkv.weight"].shape == ((1 + 2) * HEAD, 64)


def _config_only(tmp_path: Path, config: dict[str, Any]) -> Path:
    """A model dir with a config.json and no weights: layout errors must come before any weight is read."""
    model_dir = tmp_path / "config_only"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(config))
    return model_dir


MPT_CONFIG = {"model_type": "mpt", "d_model": 64, "n_heads": 4, "n_layers": 2, "vocab_size": 512,
              "max_seq_len": 128, "expansion_ratio": 4, "no_bias": True,
              "attn_config": {"alibi": True, "attn_type": "multihead_attention"}}
DBRX_CONFIG = {"model_type": "dbrx", "d_model": 64, "n_heads": 4, "n_layers": 2, "vocab_size": 512,
               "max_seq_len": 128, "attn_config": {"kv_n_heads": 2, "clip_qkv": 8, "rope_theta": 10000},
               "ffn_config": {"ffn_hidden_size": 90, "moe_num_experts": 6, "moe_top_k": 2}}


@pytest.mark.parametrize(("config", "layout", "message"), [
    (MPT_CONFIG, {"tensor_parallel_size": 3}, r"--tp-size 3 does not divide the number of attention heads \(4, config n_heads\)"),
    ({**MPT_CONFIG, "n_heads": 8, "attn_config": {"attn_type": "grouped_query_attention", "kv_n_heads": 4}},
     {"tensor_parallel_size": 6}, r"--tp-size 6 does not divide"),
    ({**MPT_CONFIG, "d_model": 96, "n_heads": 12, "attn_config": {"attn_type": "grouped_query_attention", "kv_n_heads": 3}},
     {"tensor_parallel_size": 2}, r"KV heads \(3, config attn_config.kv_n_heads\) are incompatible"),
    (MPT_CONFIG, {"pipeline_parallel_size": 3}, r"--pp-size 3 is larger than the number of layers \(2, config n_layers\)"),
    (DBRX_CONFIG, {"tensor_parallel_size": 2, "moe_tensor_parallel_size": 2, "moe_expert_parallel_size": 2},
     r"moe_tp_size \(2\) x moe_ep_size \(2\) must equal tp_size \(2\)"),
    (DBRX_CONFIG, {"tensor_parallel_size": 4, "moe_expert_parallel_size": 4},
     r"--moe-ep-size 4 does not divide the number of experts \(6, config ffn_config.moe_num_experts\)"),
    (DBRX_CONFIG, {"tensor_parallel_size": 4}, r"--moe-tp-size 4 does not divide the expert size \(90, "
                                                r"config ffn_config.ffn_hidden_size\)"),
    ({**MPT_CONFIG, "attn_config": {"qk_ln": True}}, {"tensor_parallel_size": 2}, r"qk_ln .* needs --tp-size 1"),
    (MPT_CONFIG, {"tensor_parallel_size": 2, "moe_expert_parallel_size": 2}, r"--moe-ep-size .* MPT has no experts"),
    (MPT_CONFIG, {"workers": 0}, r"--workers must be at least 1"),
    (MPT_CONFIG, {"dtype": "int8"}, r"--dtype must be one of float32, float16, bfloat16 or auto"),
])
def test_bad_layouts_fail_before_reading_weights(tmp_path: Path, config: dict[str, Any], layout: dict[str, int],
                                                 message: str) -> None:
    model_dir = _config_only(tmp_path, config)
    with pytest.raises(ConfigError, match=message):
        convert(model_dir, tmp_path / "out", **layout)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config_only"]


def test_cli_convert_layout_error_exits_2(tmp_path: Path) -> None:
    model_dir = _config_only(tmp_path, MPT_CONFIG)
    result = CliRunner().invoke(main, ["convert", "--model-dir", str(model_dir), "--output", str(tmp_path / "out"),
                                       "--tp-size", "3"])
    assert result.exit_code == 2
    assert "--tp-size 3 does not divide" in result.output


def test_cli_convert_writes_checkpoint(mpt_dir: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["convert", "--model-dir", str(mpt_dir), "--output", str(tmp_path / "out"),
                                       "--tp-size", "2", "--pp-size", "2", "--dtype", "float16", "--workers", "2",
                                       "--quiet"])
    assert result.exit_code == 0, result.output
    config = read_config(tmp_path / "out")
    assert config["dtype"] == "float16" and config["mapping"]["world_size"] == 4
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json", "rank0.safetensors", "rank1.safetensors", "rank2.safetensors", "rank3.safetensors"]
