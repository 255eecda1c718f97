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
from generator.errors import GenRepoError

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
    pattern = re.compile(spec.calibration_qkv_modules)
    amax = [0.0] * spec.num_layers
    hooks = []
    for name, module in model.named_modules():
        match = pattern.search(name)
        if match and int(match.group(1)) < spec.num_layers:
            layer = int(match.group(1))

            # several modules of one layer (separate q, k, v projections) share its maximum
            def record(_module: torch.nn.Module, _inputs: object, output: torch.Tensor, layer: int = layer) -> None:
                amax[layer] = max(amax[layer], float(output.detach().abs().max()))
            hooks.append((layer, module.register_forward_hook(record)))
    hooked = {layer for layer, _ in hooks}
    if hooked != set(range(spec.num_layers)):
        for _, hook in hooks:
            hook.remove()
        raise GenRepoError(f"INT8 KV calibration found modules matching '{spec.calibration_qkv_modules}' in "
                           f"{len(hooked)} of {spec.num_layers} layers")
    try:
        with torch.no_grad():
            model(input_ids=input_ids)
    finally:
        for _, hook in hooks:
            hook.remove()
    return [value / 127.0 if value > 0 else 1.0 for value in amax]


def _load_hf_model(model_dir: Path, spec: ModelSpec, trust_remote_code: bool) -> torch.nn.Module:
    """The float32 HF model to calibrate on: the spec's own loader when it has one (transformers lacks the
    architecture's variant), else `AutoModelForCausalLM` on the config as the spec adapts it."""
    model = spec.calibration_model(model_dir, trust_remote_code)
    if model is not None:
        return model
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        spec.adapt_transformers_config(config)
        model = AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=torch.float32,
                                                     trust_remote_code=trust_remote_code)
    except Exception as error:
        raise GenRepoError(f"INT8 KV calibration cannot load the HF model from {model_dir}: {error}") from error
    return model.eval()


def _tokenize(model_dir: Path, text: str, spec: ModelSpec, trust_remote_code: bool) -> torch.Tensor:
    """Token ids of the calibration text; byte values modulo the vocabulary when the dir has no tokenizer."""
    limit = min(CALIBRATION_MAX_TOKENS, spec.max_seq_len)
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
