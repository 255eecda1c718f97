"""INT8 KV-cache calibration, in TensorRT-LLM's checkpoint format (the weight-only math is
`generator.formats.weight_only`).

INT8 KV cache (kv_cache_quant_algo "INT8"): per layer, `attention.kv_cache_scaling_factor` = max |Wqkv output| /
127 over a calibration text, measured with forward hooks on the HF model's fused QKV projection (before
clip_qkv), in float32 on CPU, as TensorRT-LLM's calibration does.
"""

from __future__ import annotations

import re
import sys
from importlib import resources
from pathlib import Path

import torch

from generator.convert.models.base import ModelSpec
from generator.convert.models.mpt import MptSpec
from generator.errors import GenRepoError
from generator.formats.hf_checkpoint import HFCheckpoint

CALIBRATION_MAX_TOKENS = 512
DEFAULT_CALIBRATION_FILE = "calib.txt"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")



def default_calibration_text() -> str:
    """The calibration text shipped with gen-repo (generator/data/calib.txt)."""
    return resources.files("generator").joinpath("data", DEFAULT_CALIBRATION_FILE).read_text(encoding="utf-8")


def calibrate_kv_cache_scales(model_dir: Path, spec: ModelSpec, text: str,
                              trust_remote_code: bool = False) -> list[float]:
    """Per-layer INT8 KV-cache scales (max |fused QKV output| / 127), running the HF model in float32 on CPU."""
    model = _load_hf_model(model_dir, spec, trust_remote_code)
    input_ids = _tokenize(model_dir, text, spec, trust_remote_code)
    suffix = spec.calibration_module_suffix
    pattern = re.compile(r"(?:^|\.)blocks\.(\d+)\." + re.escape(suffix) + "$")
    amax = [0.0] * spec.num_layers
    hooks = []
    for name, module in model.named_modules():
        match = pattern.search(name)
        if match:
            layer = int(match.group(1))

            def record(_module: torch.nn.Module, _inputs: object, output: torch.Tensor, layer: int = layer) -> None:
                amax[layer] = max(amax[layer], float(output.detach().abs().max()))
            hooks.append(module.register_forward_hook(record))
    if len(hooks) != spec.num_layers:
        raise GenRepoError(f"INT8 KV calibration found {len(hooks)} '{suffix}' modules, expected {spec.num_layers}")
    try:
        with torch.no_grad():
            model(input_ids=input_ids)
    finally:
        for hook in hooks:
            hook.remove()
    return [value / 127.0 if value > 0 else 1.0 for value in amax]


def _load_hf_model(model_dir: Path, spec: ModelSpec, trust_remote_code: bool) -> torch.nn.Module:
    if isinstance(spec, MptSpec) and not trust_remote_code:
        return _transformers_mpt(model_dir, spec)
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        if getattr(config, "model_type", "") == "dbrx":
            _fix_dbrx_config(config)
        model = AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=torch.float32,
                                                     trust_remote_code=trust_remote_code)
    except Exception as error:
        raise GenRepoError(f"INT8 KV calibration cannot load the HF model from {model_dir}: {error}") from error
    return model.eval()


def _transformers_mpt(model_dir: Path, spec: MptSpec) -> torch.nn.Module:
    """transformers' MptForCausalLM (MHA only) holding the checkpoint's weights, GQA/MQA KV heads repeated.

    A query head h of llm-foundry's GQA attends KV head h // (heads / kv_heads); repeating each KV head that
    many times gives an MHA model with the same attention, and the repeated Wqkv rows do not change max |QKV|.
    """
    from transformers import MptConfig, MptForCausalLM

    lacking = [feature for feature, present in (
        ("attn_config.qk_ln", spec.qk_layernorm), ("learned positions (attn_config.alibi false)",
                                                    spec.learned_positions),
        ("biases (no_bias false)", spec.bias), ("attn_config.alibi_bias_max other than 8", spec.alibi_bias_max != 8),
        ("ffn sizes other than an integer expansion_ratio", spec.intermediate_size % spec.hidden_size),
    ) if present]
    if lacking:
        raise GenRepoError("INT8 KV calibration runs the model with transformers' MPT, which lacks "
                           f"{', '.join(lacking)}; pass --trust-remote-code to use the checkpoint's own code")
    d, heads, kv_heads, head_size = spec.hidden_size, spec.num_attention_heads, spec.num_key_value_heads, spec.head_size
    config = MptConfig(d_model=d, n_heads=heads, n_layers=spec.num_layers, max_seq_len=spec.max_seq_len,
                       expansion_ratio=spec.intermediate_size // d, vocab_size=spec.vocab_size, no_bias=True,
                       layer_norm_epsilon=spec.norm_epsilon, tie_word_embeddings=spec.tied,
                       attn_config={"alibi": True, "alibi_bias_max": 8, "clip_qkv": spec.clip_qkv,
                                    "attn_type": "multihead_attention"})
    with torch.device("meta"):
        model = MptForCausalLM(config)
    checkpoint = HFCheckpoint(model_dir)
    state = {}
    for name in checkpoint.names():
        tensor = checkpoint.get(name).float()
        if name.endswith("attn.Wqkv.weight") and kv_heads != heads:
            q, k, v = tensor.split([d, kv_heads * head_size, kv_heads * head_size])
            k, v = (part.view(kv_heads, head_size, d).repeat_interleave(heads // kv_heads, dim=0).reshape(d, d)
                    for part in (k, v))
            tensor = torch.cat([q, k, v])
        state["lm_head.weight" if name.endswith("lm_head.weight") else name] = tensor
    if spec.tied:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        raise GenRepoError(f"INT8 KV calibration cannot load {model_dir} into transformers' MPT: {error}") from error
    if spec.tied:
        model.tie_weights()
    return model.eval()


def _fix_dbrx_config(config: object) -> None:
    """transformers 5 reads RoPE from `rope_parameters` and wants a float normalization exponent."""
    attn, ffn = getattr(config, "attn_config", None), getattr(config, "ffn_config", None)
    theta = getattr(attn, "rope_theta", None)
    if theta is not None:
        config.rope_parameters = {"rope_theta": float(theta), "rope_type": "default"}  # type: ignore[attr-defined]
    norm = getattr(ffn, "moe_normalize_expert_weights", None)
    if isinstance(norm, int):
        ffn.moe_normalize_expert_weights = float(norm)  # type: ignore[union-attr]


def _tokenize(model_dir: Path, text: str, spec: ModelSpec, trust_remote_code: bool) -> torch.Tensor:
    """Token ids of the calibration text; byte values modulo the vocabulary when the dir has no tokenizer."""
    limit = min(CALIBRATION_MAX_TOKENS, int(spec.hf_config.get("max_seq_len") or CALIBRATION_MAX_TOKENS))
    ids: list[int] = []
    # transformers 5 hands out an empty tokenizer for a dir without tokenizer files, so look for them first
    if any((Path(model_dir) / name).exists() for name in _TOKENIZER_FILES):
        from generator.formats.tokenizer import (
            load_tokenizer,  # the same loader serving uses (HF and tiktoken dirs)
        )

        try:
            ids = list(load_tokenizer(model_dir, trust_remote_code=trust_remote_code).encode(text))
        except GenRepoError:
            raise
        except Exception as error:
            raise GenRepoError(f"INT8 KV calibration cannot load the tokenizer in {model_dir} (does it need "
                               f"--trust-remote-code?): {error}") from error
    else:
        print(f"warning: no tokenizer in {model_dir}; calibrating INT8 KV on UTF-8 byte ids", file=sys.stderr)
        ids = [byte % spec.vocab_size for byte in text.encode("utf-8")]
    if not ids:
        raise GenRepoError("the INT8 KV calibration text gives no tokens")
    return torch.tensor([ids[:limit]])
