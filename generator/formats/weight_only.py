"""Weight-only INT8/INT4 tensors: which weights are quantized, the math, and the engine dir's plain layout.

A checkpoint (quant_algo "W8A16" / "W4A16") holds the GEMM weights in float and only records `quant_algo`,
which is what TensorRT-LLM's loader expects (`preprocess_weights` -> `weight_only_quantize_dict` quantizes float
weights into its GPU-specific interleaved layout and takes int8 ones as already interleaved). The pytorch
build (`generator.build`) quantizes them into the engine dir: the GEMM weights (attention.qkv, attention.dense,
mlp.fc, mlp.proj; never lm_head, the MoE router or the embeddings), per rank, i.e. after the tensor-parallel
split, symmetrically per output channel, as TensorRT-LLM's `symmetric_quantize` does:

    scale[c] = max_i |W[c, i]| / 2^(bits-1)        (/128 for int8, /8 for int4; stored in the model dtype)
    q[i, c]  = clamp(round_half_away_from_zero(W[c, i] / scale[c]), -2^(bits-1), 2^(bits-1) - 1)

In the engine dir the weight is stored transposed, [in, out] ([E, in, out] for MoE experts), as int8 in a plain
(non-interleaved) layout; int4 values are packed two per byte along `out`: the low nibble holds the even
column, the high nibble the odd one. The scale is stored as `<name>.per_channel_scale`, [out] ([E, out] for
experts). The pytorch engine reads it with `dequantize_weight` or its kernels (`generator.engine.weight_only`).
"""

from __future__ import annotations

import torch

from generator.errors import GenRepoError

#: `--weight-only-precision` -> the checkpoint's `quantization.quant_algo`
WEIGHT_ONLY_ALGOS = {"int8": "W8A16", "int4": "W4A16"}
_PRECISIONS = {algo: precision for precision, algo in WEIGHT_ONLY_ALGOS.items()}
_BITS = {"int8": 8, "int4": 4}
_QUANTIZED_SUFFIXES = ("attention.qkv.weight", "attention.dense.weight", "mlp.fc.weight", "mlp.proj.weight")


def weight_only_precision(quant_algo: str | None) -> str | None:
    """"int8" / "int4" for a weight-only quant_algo (W8A16 / W4A16), None for no or another quantization."""
    return _PRECISIONS.get(quant_algo or "")


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
