"""Weight-only INT8/INT4 quantization and INT8 KV-cache calibration, in TensorRT-LLM's checkpoint format.

Weight-only (quant_algo "W8A16" / "W4A16"): a checkpoint holds the GEMM weights in float and only records
`quant_algo`, which is what TensorRT-LLM's loader expects (`preprocess_weights` -> `weight_only_quantize_dict`
quantizes float weights into its GPU-specific interleaved layout and takes int8 ones as already interleaved).
`gen-repo build --engine pytorch` then quantizes them into the engine dir (`generator.build.pytorch.quantize_rank_file`):
the GEMM weights (attention.qkv, attention.dense, mlp.fc, mlp.proj; never lm_head, the MoE router or the
embeddings), per rank, i.e. after the tensor-parallel split, symmetrically per output channel, as TensorRT-LLM's
`symmetric_quantize` does:

    scale[c] = max_i |W[c, i]| / 2^(bits-1)        (/128 for int8, /8 for int4; stored in the model dtype)
    q[i, c]  = clamp(round_half_away_from_zero(W[c, i] / scale[c]), -2^(bits-1), 2^(bits-1) - 1)

In the engine dir the weight is stored transposed, [in, out] ([E, in, out] for MoE experts), as int8 in a plain
(non-interleaved) layout; int4 values are packed two per byte along `out`: the low nibble holds the even
column, the high nibble the odd one. The scale is stored as `<name>.per_channel_scale`, [out] ([E, out] for
experts). The pytorch engine reads it with `dequantize_weight`.

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

WEIGHT_ONLY_ALGOS = {"int8": "W8A16", "int4": "W4A16"}
_BITS = {"int8": 8, "int4": 4}
_QUANTIZED_SUFFIXES = ("attention.qkv.weight", "attention.dense.weight", "mlp.fc.weight", "mlp.proj.weight")
CALIBRATION_MAX_TOKENS = 512
DEFAULT_CALIBRATION_FILE = "calib.txt"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def is_weight_only_target(name: str) -> bool:
    """Whether weight-only quantization applies to this TensorRT-LLM tensor name."""
    return name.endswith(_QUANTIZED_SUFFIXES)


def per_channel_scale_name(weight_name: str) -> str:
    return weight_name.removesuffix("weight") + "per_channel_scale"


def _check_precision(precision: str) -> int:
    if precision not in _BITS:
        raise GenRepoError(f"weight-only precision must be int8 or int4, got {precision!r}")
    return _BITS[precision]


def quantize_weight(weight: torch.Tensor, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a float weight [out, in] (or experts [E, out, in]).

    Returns (int8 weight [.., in, out] or packed int4 [.., in, out / 2], scale [.., out] in weight's dtype).
    """
    bits = _check_precision(precision)
    levels = 2 ** (bits - 1)
    transposed = weight.transpose(-1, -2).float()  # [.., in, out]
    scale = transposed.abs().amax(dim=-2) / levels  # [.., out]
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    ratio = transposed / safe.unsqueeze(-2)
    rounded = torch.sign(ratio) * torch.floor(ratio.abs() + 0.5)  # C++ std::round: halves away from zero
    quantized = rounded.clamp(-levels, levels - 1).to(torch.int8)
    quantized = torch.where(scale.unsqueeze(-2) == 0, torch.zeros_like(quantized), quantized)
    if bits == 4:
        quantized = pack_int4(quantized)
    return quantized.contiguous(), scale.to(weight.dtype).contiguous()


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """Pack int8 values in [-8, 7] two per byte along the last axis (low nibble = even index)."""
    if values.shape[-1] % 2:
        raise GenRepoError(f"int4 packing needs an even number of output channels, got {values.shape[-1]}")
    low = values[..., 0::2].to(torch.int16) & 0x0F
    high = (values[..., 1::2].to(torch.int16) & 0x0F) << 4
    packed = low | high
    return torch.where(packed > 127, packed - 256, packed).to(torch.int8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: int8 values in [-8, 7], twice as many along the last axis."""
    low = torch.bitwise_right_shift(torch.bitwise_left_shift(packed, 4), 4)  # arithmetic shift sign-extends
    high = torch.bitwise_right_shift(packed, 4)
    return torch.stack([low, high], dim=-1).flatten(-2)


def dequantize_weight(weight: torch.Tensor, per_channel_scale: torch.Tensor, precision: str) -> torch.Tensor:
    """Undo `quantize_weight`: the [out, in] (or [E, out, in]) weight in per_channel_scale's dtype."""
    bits = _check_precision(precision)
    values = unpack_int4(weight) if bits == 4 else weight
    restored = values.float() * per_channel_scale.float().unsqueeze(-2)  # [.., in, out]
    return restored.transpose(-1, -2).contiguous().to(per_channel_scale.dtype)


# --- INT8 KV cache ------------------------------------------------------------------------------------------


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
