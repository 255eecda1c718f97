"""The preallocated KV cache: one slot of `max_seq_len` positions per concurrent request.

Layout per layer: `[max_batch_size, kv_heads, max_seq_len, head_size]`. The executor hands out the lowest free
slots, so a batch usually covers slots 0..B-1 and attention reads a view of the cache instead of a gather.
With an INT8 KV cache (`kv_cache_quant_algo: INT8`) K and V are stored as `round(x / scale)` in int8 with the
layer's `kv_cache_scaling_factor` and dequantized on read, as TensorRT-LLM does.
"""

from __future__ import annotations

import torch


class KVCache:
    """K and V of every local layer for `max_batch_size` slots."""

    def __init__(self, num_layers: int, max_batch_size: int, num_kv_heads: int, max_seq_len: int,
                 head_size: int, dtype: torch.dtype, device: torch.device,
                 int8_scales: list[float] | None = None) -> None:
        self.dtype = dtype
        self.int8_scales = int8_scales
        storage = torch.int8 if int8_scales is not None else dtype
        shape = (max_batch_size, num_kv_heads, max_seq_len, head_size)
        self.keys = [torch.zeros(shape, dtype=storage, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=storage, device=device) for _ in range(num_layers)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def _store(self, layer: int, tensor: torch.Tensor) -> torch.Tensor:
        if self.int8_scales is None:
            return tensor
        scale = self.int8_scales[layer]
        return torch.round(tensor.float() / scale).clamp_(-128, 127).to(torch.int8)

    def _load(self, layer: int, tensor: torch.Tensor) -> torch.Tensor:
        if self.int8_scales is None:
            return tensor
        return tensor.to(self.dtype) * self.int8_scales[layer]

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor,
              keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store token `i`'s K/V (`keys[i]`: `[kv_heads, head_size]`) at `(slots[i], positions[i])`."""
        self.keys[layer][slots, :, positions] = self._store(layer, keys)
        self.values[layer][slots, :, positions] = self._store(layer, values)

    def read(self, layer: int, slots: torch.Tensor | slice, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of `slots` over positions `[0, length)`: `[batch, kv_heads, length, head_size]`."""
        keys = self.keys[layer][slots, :, :length]
        values = self.values[layer][slots, :, :length]
        return self._load(layer, keys), self._load(layer, values)
