"""The paged KV cache: ONE pool of fixed-size blocks per rank, shared by every sequence through block tables.

Layout: `[layers, 2 (K, V), num_blocks, block_size, kv_heads, head_size]`, so the K (or V) of token `t` of a
sequence lives at flat slot `block_table[t // block_size] * block_size + t % block_size` of its layer's
`[num_blocks * block_size, kv_heads, head_size]` view. Block 0 is never handed out: padding rows (CUDA-graph
batches padded to a captured size, block tables padded to their width) write into it and read from it.
With an INT8 KV cache (`kv_cache_quant_algo: INT8`) K and V are stored as `round(x / scale)` in int8 with the
layer's `kv_cache_scaling_factor` and dequantized on read, as TensorRT-LLM does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from generator.engine.attention import kernel_available, store_kv
from generator.errors import ConfigError

DEFAULT_BLOCK_SIZE = 32
# without a GPU nothing says how much memory the cache may take: at most this much unless told (max_tokens...)
_CPU_POOL_BYTES = 2 * 2**30


@dataclass(frozen=True)
class KVCacheSettings:
    """How big the pool may be (the Triton model's `kv_cache_free_gpu_mem_fraction` /
    `max_tokens_in_paged_kv_cache`) and whether full prefix blocks are shared across requests."""

    free_gpu_memory_fraction: float = 0.9
    max_tokens: int | None = None
    enable_reuse: bool = False
    block_size: int = DEFAULT_BLOCK_SIZE


def bytes_per_token(num_layers: int, kv_heads: int, head_size: int, element_size: int) -> int:
    """Bytes one token's K and V take over `num_layers` layers."""
    return 2 * num_layers * kv_heads * head_size * element_size


def pool_blocks(settings: KVCacheSettings, *, token_bytes: int, needed_tokens: int, device: torch.device,
                reserve_bytes: int = 0) -> int:
    """How many blocks the pool gets (block 0, the padding block, included).

    `max_tokens` when given; else on CUDA `free_gpu_memory_fraction` of the memory free now (after the weights)
    less `reserve_bytes` for activations; on CPU enough for `needed_tokens` (every sequence at full length)
    within a fixed budget. Without reuse the pool never grows past `needed_tokens`: more could not be used.
    """
    size = settings.block_size
    if settings.max_tokens is not None:
        tokens = settings.max_tokens
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        tokens = int((free * settings.free_gpu_memory_fraction - reserve_bytes) // token_bytes)
        if not settings.enable_reuse:
            tokens = min(tokens, needed_tokens)
    else:
        tokens = min(needed_tokens, _CPU_POOL_BYTES // token_bytes)
    blocks = tokens // size + 1
    if blocks < 2:
        raise ConfigError(f"the KV cache has room for {max(0, tokens)} tokens, less than one block of {size}: "
                          "raise kv_cache_free_gpu_mem_fraction / max_tokens_in_paged_kv_cache, or free GPU memory")
    return blocks


class KVPool:
    """K and V of every local layer in one tensor of blocks."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                 dtype: torch.dtype, device: torch.device, int8_scales: list[float] | None = None) -> None:
        self.dtype = dtype
        self.int8_scales = int8_scales
        self.num_blocks = num_blocks
        self.block_size = block_size
        storage = torch.int8 if int8_scales is not None else dtype
        self.use_kernel = int8_scales is None and kernel_available(device)
        try:
            self.data = torch.zeros((num_layers, 2, num_blocks, block_size, num_kv_heads, head_size),
                                    dtype=storage, device=device)
        except torch.cuda.OutOfMemoryError as error:
            raise ConfigError(f"the KV cache ({num_blocks} blocks of {block_size} tokens) does not fit on {device}: "
                              "lower kv_cache_free_gpu_mem_fraction or max_tokens_in_paged_kv_cache") from error

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    @property
    def num_tokens(self) -> int:
        """Tokens the pool holds, the padding block excluded."""
        return (self.num_blocks - 1) * self.block_size

    def blocks(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V blocks of `layer`: `[num_blocks, block_size, kv_heads, head_size]` each (stored dtype)."""
        return self.data[layer, 0], self.data[layer, 1]

    def flat(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of `layer` by slot: `[num_blocks * block_size, kv_heads, head_size]` each."""
        keys, values = self.blocks(layer)
        return keys.flatten(0, 1), values.flatten(0, 1)

    def scale(self, layer: int) -> float | None:
        return self.int8_scales[layer] if self.int8_scales is not None else None

    def store(self, layer: int, tensor: torch.Tensor) -> torch.Tensor:
        if self.int8_scales is None:
            return tensor
        return torch.round(tensor.float() / self.int8_scales[layer]).clamp_(-128, 127).to(torch.int8)

    def load(self, layer: int, tensor: torch.Tensor) -> torch.Tensor:
        if self.int8_scales is None:
            return tensor
        return tensor.to(self.dtype) * self.int8_scales[layer]

    def write(self, layer: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store token `i`'s K/V (`keys[i]`: `[kv_heads, head_size]`) at flat slot `slots[i]`."""
        flat_keys, flat_values = self.flat(layer)
        if self.use_kernel and keys.stride(-1) == 1 and values.stride(-1) == 1:
            store_kv(keys, values, slots, flat_keys, flat_values)  # one launch instead of two scatters
            return
        flat_keys[slots] = self.store(layer, keys)
        flat_values[slots] = self.store(layer, values)

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V at `slots` (any shape S): `[*S, kv_heads, head_size]` in the compute dtype."""
        flat_keys, flat_values = self.flat(layer)
        return self.load(layer, flat_keys[slots]), self.load(layer, flat_values[slots])
