"""Tiny random Hugging Face checkpoints for tests, built offline with transformers' config classes.

Weights are drawn with a larger std than transformers' default so that greedy logits are well separated and
parity does not hinge on float rounding.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

INIT_STD = 0.15


def _randomize(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                # norms near 1 / biases near 0, but not exactly, so a wrong name map shows up
                base = 1.0 if name.endswith("weight") else 0.0
                parameter.copy_(base + 0.1 * torch.randn(parameter.shape, generator=generator))
            else:
                parameter.copy_(INIT_STD * torch.randn(parameter.shape, generator=generator))


def make_mpt(out_dir: Path, *, seed: int = 0, d_model: int = 64, n_heads: int = 4, n_layers: int = 2,
             vocab_size: int = 512, max_seq_len: int = 128, attn_config: dict[str, Any] | None = None,
             **overrides: Any) -> Path:
    """Save a tiny random `MptForCausalLM` (ALiBi, no bias by default) to `out_dir` and return it."""
    from transformers import MptConfig, MptForCausalLM

    attn = {"alibi": True, "alibi_bias_max": 8, "clip_qkv": None, "attn_impl": "torch"}
    attn.update(attn_config or {})
    config = MptConfig(d_model=d_model, n_heads=n_heads, n_layers=n_layers, expansion_ratio=4,
                       max_seq_len=max_seq_len, vocab_size=vocab_size, attn_config=attn,
                       **{"no_bias": True, "norm_type": "low_precision_layernorm", **overrides})
    torch.manual_seed(seed)
    model = MptForCausalLM(config).eval()
    _randomize(model, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    return out_dir


def make_dbrx(out_dir: Path, *, seed: int = 0, d_model: int = 64, n_heads: int = 4, kv_n_heads: int = 2,
              n_layers: int = 2, vocab_size: int = 512, max_seq_len: int = 128, num_experts: int = 4,
              top_k: int = 2, ffn_hidden_size: int = 96, clip_qkv: float | None = 8.0,
              rope_theta: float = 500000.0, normalize_expert_weights: float | None = 1.0) -> Path:
    """Save a tiny random `DbrxForCausalLM` to `out_dir` and return it.

    transformers 5.x ignores `attn_config.rope_theta` (it reads `rope_parameters`), so both are written.
    """
    from transformers import DbrxConfig, DbrxForCausalLM

    config = DbrxConfig(
        d_model=d_model, n_heads=n_heads, n_layers=n_layers, max_seq_len=max_seq_len, vocab_size=vocab_size,
        attn_config={"kv_n_heads": kv_n_heads, "clip_qkv": clip_qkv, "rope_theta": rope_theta},
        ffn_config={"ffn_hidden_size": ffn_hidden_size, "moe_num_experts": num_experts, "moe_top_k": top_k,
                    "ffn_act_fn": {"name": "silu"}, "moe_normalize_expert_weights": normalize_expert_weights},
        rope_parameters={"rope_theta": rope_theta, "rope_type": "default"}, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = DbrxForCausalLM(config).eval()
    _randomize(model, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    return out_dir


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
