"""Tiny random Hugging Face checkpoints for tests: each registered architecture's own tiny factory
(`ModelSpec.tiny_hf_model`, via `generator.convert.models.write_tiny_checkpoint`), here with the argument names the
tests have always used.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from generator.convert.models import TinyShape, spec_class, write_tiny_checkpoint


def make_tiny(architecture: str, out_dir: Path, shape: TinyShape | None = None, *, seed: int = 0,
              **hf_overrides: Any) -> Path:
    """Save a tiny random checkpoint of a registered architecture (TensorRT-LLM name) and return its dir."""
    return write_tiny_checkpoint(spec_class(architecture), out_dir, shape, seed=seed, **hf_overrides)


def make_mpt(out_dir: Path, *, seed: int = 0, d_model: int = 64, n_heads: int = 4, n_layers: int = 2,
             vocab_size: int = 512, max_seq_len: int = 128, attn_config: dict[str, Any] | None = None,
             **overrides: Any) -> Path:
    """Save a tiny random `MptForCausalLM` (ALiBi, no bias by default) to `out_dir` and return it."""
    shape = TinyShape(hidden_size=d_model, num_attention_heads=n_heads, num_hidden_layers=n_layers,
                      vocab_size=vocab_size, max_position_embeddings=max_seq_len)
    return make_tiny("MPTForCausalLM", out_dir, shape, seed=seed, attn_config=attn_config or {}, **overrides)


def make_dbrx(out_dir: Path, *, seed: int = 0, d_model: int = 64, n_heads: int = 4, kv_n_heads: int = 2,
              n_layers: int = 2, vocab_size: int = 512, max_seq_len: int = 128, num_experts: int = 4,
              top_k: int = 2, ffn_hidden_size: int = 96, clip_qkv: float | None = 8.0,
              rope_theta: float = 500000.0, normalize_expert_weights: float | None = 1.0) -> Path:
    """Save a tiny random `DbrxForCausalLM` to `out_dir` and return it."""
    shape = TinyShape(hidden_size=d_model, num_attention_heads=n_heads, num_key_value_heads=kv_n_heads,
                      num_hidden_layers=n_layers, vocab_size=vocab_size, max_position_embeddings=max_seq_len,
                      intermediate_size=ffn_hidden_size, num_experts=num_experts, experts_per_token=top_k,
                      clip_qkv=clip_qkv, rope_theta=rope_theta)
    return make_tiny("DbrxForCausalLM", out_dir, shape, seed=seed,
                     ffn_config={"moe_normalize_expert_weights": normalize_expert_weights})


def hf_greedy(model_dir: Path, prompts: list[list[int]], max_new_tokens: int,
              dtype: torch.dtype = torch.float32) -> list[list[int]]:
    """transformers' greedy `generate` for each prompt alone: the new token ids only."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    outputs = []
    with torch.no_grad():
        for ids in prompts:
            input_ids = torch.tensor([ids])
            out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                 pad_token_id=0, eos_token_id=None)
            outputs.append(out[0, len(ids):].tolist())
    return outputs


def read_config(model_dir: Path) -> dict[str, Any]:
    return json.loads((model_dir / "config.json").read_text())
