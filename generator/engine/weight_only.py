"""Weight-only int8/int4 linears that stay quantized in device memory and run mixed-precision kernels.

The engine dir holds the plain layout of `generator.formats.weight_only` (int8 `[in, out]`, or int4 packed two per byte
along `out`, plus a per-output-channel scale). At load each weight is converted once into what a torch kernel
wants, and the float weight is never materialized:

- int8 on CPU: `torch._weight_int8pack_mm` (int8 `[out, in]` + scale `[out]`).
- int8 on CUDA: up to 64 rows (decode) our Triton kernels (`triton_w8a16`: split-K GEMV / swap-AB tensor-core
  tiles that stream the `[out, in]` int8 weight once; torch's CUDA `_weight_int8pack_mm` is one naive thread per
  output), more rows (prefill, compute-bound) convert the weight inside the call and use cuBLAS.
- int4 on CUDA, bf16: tinygemm, `torch._convert_weight_to_int4pack` + `torch._weight_int4pack_mm`
  (unsigned nibbles `q + 8`, the even column in the high nibble; scale-and-zero `[in / group, out, 2]`, the
  per-channel scale repeated over the groups, zero 0).
- int4 on CPU: `torch._convert_weight_to_int4pack_for_cpu` + `torch._weight_int4pack_mm_for_cpu` (same
  numbers, int32 nibbles in, any float dtype).
- otherwise (a shape or dtype a kernel refuses): the quantized weight is kept and dequantized inside each call
  (`dequant`), so memory is still saved.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from generator.formats.weight_only import unpack_int4

_INT4_GROUP_SIZES = (256, 128, 64, 32)  # what both int4 kernels accept, largest (fewest scales) first
# "dequant", "int8pack" or "triton" forces that kernel where it applies, "load" makes the engine dequantize the
# whole model at load (the old behaviour); tests and benchmarks compare them
KERNEL_ENV = "GEN_REPO_WEIGHT_ONLY_KERNEL"
_TRITON_MAX_ROWS = 64


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _group_size(in_features: int) -> int | None:
    return next((size for size in _INT4_GROUP_SIZES if in_features % size == 0), None)


class WeightOnlyLinear:
    """`y = x @ W^T` for a weight-only quantized `W [out, in]` with a per-output-channel scale."""

    def __init__(self, values: torch.Tensor, scale: torch.Tensor, precision: str, dtype: torch.dtype,
                 device: torch.device) -> None:
        """`values`: the integer weight `[in, out]` (int8, unpacked), `scale`: `[out]`."""
        self.precision = precision
        self.in_features, self.out_features = int(values.shape[0]), int(values.shape[1])
        self.dtype = dtype
        self.group_size = 0
        self.inner_k_tiles = 0
        self.counters: torch.Tensor | None = None  # the Triton kernel's split-K counters (allocated at load)
        q = values.t().contiguous()  # [out, in] int8
        self.kernel = self._pick_kernel(device)
        if self.kernel in ("int8pack", "int8_triton"):
            self.weight = q.to(device)
            self.scales = scale.to(device=device, dtype=dtype).contiguous()
            if self.kernel == "int8_triton":
                from generator.engine.triton_w8a16 import new_counters

                self.counters = new_counters(self.out_features, device)
        elif self.kernel in ("int4_tinygemm", "int4_cpu"):
            group = _group_size(self.in_features)
            assert group is not None
            self.group_size = group
            unsigned = (q.to(torch.int32) + 8).to(device)  # tinygemm's nibbles: w = (u - 8) * s + zero
            groups = self.in_features // group
            scale_and_zero = torch.zeros(groups, self.out_features, 2, dtype=dtype, device=device)
            scale_and_zero[..., 0] = scale.to(device=device, dtype=dtype)[None, :]
            self.scales = scale_and_zero
            if self.kernel == "int4_tinygemm":
                packed = ((unsigned[:, 0::2] << 4) | unsigned[:, 1::2]).to(torch.uint8)
                self.weight = torch._convert_weight_to_int4pack(packed, self.inner_k_tiles)
            else:
                self.weight = torch._convert_weight_to_int4pack_for_cpu(unsigned, 2)
        else:  # dequant: int8 [out, in] (int4 values too: a nibble per byte is simpler than repacking)
            self.weight = q.to(device)
            self.scales = scale.to(device=device, dtype=dtype).contiguous()

    def _pick_kernel(self, device: torch.device) -> str:
        forced = os.environ.get(KERNEL_ENV)
        if forced == "dequant":
            return "dequant"
        n, k = self.out_features, self.in_features
        if self.precision == "int8":
            if forced == "triton" and triton_available():  # on CPU only under TRITON_INTERPRET=1 (tests)
                return "int8_triton"
            if device.type == "cuda" and forced != "int8pack" and triton_available():
                return "int8_triton"
            return "int8pack" if hasattr(torch, "_weight_int8pack_mm") else "dequant"
        group = _group_size(k)
        if device.type == "cuda":
            tiles = next((t for t in (8, 4, 2) if k % (t * 16) == 0), 0)
            if (self.dtype == torch.bfloat16 and group and tiles and n % 8 == 0
                    and hasattr(torch, "_weight_int4pack_mm")):
                self.inner_k_tiles = tiles
                return "int4_tinygemm"
            return "dequant"
        if device.type == "cpu" and group and n % 16 == 0 and hasattr(torch, "_weight_int4pack_mm_for_cpu"):
            return "int4_cpu"
        return "dequant"

    @property
    def nbytes(self) -> int:
        """Bytes this linear holds on its device (weight + scales); the dequant fallback keeps int4 as int8."""
        counters = 0 if self.counters is None else self.counters.numel() * 4
        return (self.weight.numel() * self.weight.element_size() + self.scales.numel() * self.scales.element_size()
                + counters)

    def dequantized(self) -> torch.Tensor:
        """The float weight `[out, in]` (for tests and the dequant fallback)."""
        if self.kernel in ("int8pack", "int8_triton", "dequant"):
            return (self.weight.float() * self.scales.float()[:, None]).to(self.dtype)
        identity = torch.eye(self.in_features, dtype=self.dtype, device=self.weight.device)
        return self(identity).t().contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        if self.kernel == "int8pack":
            out = torch._weight_int8pack_mm(flat.contiguous(), self.weight, self.scales)
        elif self.kernel == "int8_triton" and flat.shape[0] <= _TRITON_MAX_ROWS:
            from generator.engine.triton_w8a16 import w8a16_mm

            out = w8a16_mm(flat.contiguous(), self.weight, self.scales, counters=self.counters)
        elif self.kernel == "int4_tinygemm":
            out = torch._weight_int4pack_mm(flat.contiguous(), self.weight, self.group_size, self.scales)
        elif self.kernel == "int4_cpu":
            out = torch._weight_int4pack_mm_for_cpu(flat.contiguous(), self.weight, self.group_size, self.scales)
        else:
            out = F.linear(flat, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        return out.reshape(*shape[:-1], self.out_features)


def plain_values(weight: torch.Tensor, precision: str) -> torch.Tensor:
    """The stored int8 weight, or the packed int4 one unpacked: integer values `[.., in, out]` as int8."""
    if precision != "int4":
        return weight
    return unpack_int4(weight)


def weight_only_linear(weight: torch.Tensor, scale: torch.Tensor, precision: str, dtype: torch.dtype,
                       device: torch.device) -> WeightOnlyLinear:
    """A linear from one stored plain-layout weight `[in, out]` (int4: `[in, out / 2]`) and its scale `[out]`."""
    return WeightOnlyLinear(plain_values(weight, precision), scale, precision, dtype, device)


@dataclass
class QuantizedExperts:
    """One layer's weight-only fc or proj for this rank's experts.

    `linears`: one linear over every expert side by side (fc: one GEMM for all experts) or one per expert
    (proj). For int8 weights also `stack` (int8 `[E, out, in]`, the linears' own storage, not a copy) and
    `scales` (`[E, out]`), which `moe.py`'s gather path reads per (token, expert) pair."""

    linears: list[WeightOnlyLinear]
    stack: torch.Tensor | None = None
    scales: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return sum(linear.nbytes for linear in self.linears)


_INT8_KERNELS = ("int8pack", "int8_triton", "dequant")


def expert_linears(weight: torch.Tensor, scale: torch.Tensor, precision: str, dtype: torch.dtype,
                   device: torch.device, concatenate: bool) -> QuantizedExperts:
    """Stored experts `[E, in, out]` + scales `[E, out]` -> one linear per expert, or one linear whose outputs
    are every expert's outputs side by side (`concatenate`: one GEMM for all experts' fc)."""
    values = plain_values(weight, precision)
    experts, inputs, outputs = values.shape
    if concatenate:
        side_by_side = values.permute(1, 0, 2).reshape(inputs, experts * outputs)
        linear = WeightOnlyLinear(side_by_side, scale.reshape(-1), precision, dtype, device)
        if precision == "int8" and linear.kernel in _INT8_KERNELS:  # [E * out, in] is already [E, out, in]
            return QuantizedExperts([linear], linear.weight.view(experts, outputs, inputs),
                                    linear.scales.view(experts, outputs))
        return QuantizedExperts([linear])
    linears = [WeightOnlyLinear(values[e], scale[e], precision, dtype, device) for e in range(experts)]
    if precision == "int8" and all(linear.kernel in _INT8_KERNELS for linear in linears):
        stack = torch.stack([linear.weight for linear in linears])
        scales = torch.stack([linear.scales for linear in linears])
        for index, linear in enumerate(linears):  # share the stack's storage instead of keeping both
            linear.weight, linear.scales = stack[index], scales[index]
        return QuantizedExperts(linears, stack, scales)
    return QuantizedExperts(linears)
