"""The model runner: one rank's share of a generic decoder, driven only by the TensorRT-LLM checkpoint config.

Covers what MPT (ALiBi, clip_qkv, optional qk LayerNorm / learned positions / biases) and DBRX (RoPE, GQA,
mixture of experts) need. Numerics follow the Hugging Face reference implementations: exact-erf GELU,
LayerNorm, softmax in float32 inside attention, float32 router and logits.

One forward runs the new tokens of `B` sequences flattened to `[N]`, each sequence with its own number of
tokens already in the paged KV pool, so one forward mixes decode rows (one token) and prefill chunks.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch.nn.attention import sdpa_kernel

from generator.engine.attention import (
    ATTENTION_BACKENDS,
    add_layer_norm,
    decode_attention,
    fused_norm_available,
    paged_prefill_attention,
)
from generator.engine.config import EngineConfig, alibi_slopes
from generator.engine.decode_gemm import DecodeGemm
from generator.engine.distributed import Communicator
from generator.engine.kv_cache import KVPool, bytes_per_token
from generator.engine.moe import METHOD_ENV, Experts, moe_forward, route
from generator.engine.weight_only import (
    KERNEL_ENV,
    QuantizedExperts,
    WeightOnlyLinear,
    expert_linears,
    weight_only_linear,
)
from generator.errors import ConfigError
from generator.formats.dtypes import stored_dtype
from generator.formats.weight_only import (
    dequantize_weight,
    is_weight_only_target,
    quantize_weight,
    weight_only_precision,
)

# keys gathered from the pool are padded to a multiple of this (masked), so kernels see few distinct shapes
_KEY_LENGTH_BUCKET = 16


@dataclass(frozen=True)
class ForwardPlan:
    """What every rank runs in one forward: per sequence its new tokens, how many of its tokens the KV pool
    already holds, and its block table (covering past + new tokens).

    Rows with one new token (decode rows) come first. Rank 0 builds it and broadcasts it; plain Python.
    """

    tokens: list[list[int]]
    past_lengths: list[int]
    block_tables: list[list[int]]

    def to_array(self) -> np.ndarray:
        """The plan as one int64 array (sent to the other ranks as a tensor): rows, then per row its token
        count, past length and table length, then every row's tokens, then every row's table."""
        counts = [len(t) for t in self.tokens]
        table_lengths = [len(t) for t in self.block_tables]
        parts = [np.array([len(counts)], dtype=np.int64), np.array(counts, dtype=np.int64),
                 np.array(self.past_lengths, dtype=np.int64), np.array(table_lengths, dtype=np.int64),
                 np.fromiter((t for row in self.tokens for t in row), dtype=np.int64, count=sum(counts)),
                 np.fromiter((b for row in self.block_tables for b in row), dtype=np.int64,
                             count=sum(table_lengths))]
        return np.concatenate(parts)

    @classmethod
    def from_array(cls, array: np.ndarray) -> ForwardPlan:
        rows = int(array[0])
        counts, past, table_lengths = (array[1 + i * rows:1 + (i + 1) * rows].tolist() for i in range(3))
        flat = array[1 + 3 * rows:].tolist()
        tokens, tables = [], []
        at = 0
        for count in counts:
            tokens.append(flat[at:at + count])
            at += count
        for length in table_lengths:
            tables.append(flat[at:at + length])
            at += length
        return cls(tokens, past, tables)

    @property
    def num_decode(self) -> int:
        """The leading rows with exactly one new token."""
        count = 0
        for row in self.tokens:
            if len(row) != 1:
                break
            count += 1
        return count


@dataclass
class ForwardBatch:
    """A `ForwardPlan` as tensors on the rank's device; the new tokens of all rows are flattened to `[N]`.

    Rows `0..num_decode-1` (tokens `0..num_decode-1`) run the paged decode attention over their block tables;
    the `gather_rows` rows after them run SDPA over keys gathered from the pool (prefill chunks, and every
    row where the decode kernel does not run), with queries padded to `[gather_rows, gather_width]`.
    """

    token_ids: torch.Tensor        # [N]
    positions: torch.Tensor        # [N]
    slot_mapping: torch.Tensor     # [N] flat pool slot where each new token's K/V goes
    last_index: torch.Tensor       # [B] flat index of each row's last new token
    num_rows: int
    num_decode: int
    decode_tables: torch.Tensor | None = None    # [D, W] int32 block ids
    decode_lengths: torch.Tensor | None = None   # [D] int32: past + 1
    gather_rows: int = 0
    gather_width: int = 0
    query_index: torch.Tensor | None = None      # [P, Tq] index among the gather tokens (padding: row's last)
    query_positions: torch.Tensor | None = None  # [P, Tq]
    key_slots: torch.Tensor | None = None        # [P, K] pool slots of the keys; None: nothing cached, the
    key_lengths: torch.Tensor | None = None      # [P]    new K/V are the whole sequences
    output_index: torch.Tensor | None = None     # [M] place of each gather token in the flat [P * Tq] output
    # prefill_in_place: the gather rows run the paged prefill kernel over their blocks instead (no padding)
    prefill_in_place: bool = False
    prefill_tables: torch.Tensor | None = None   # [P, W] int32
    prefill_starts: torch.Tensor | None = None   # [P] int32: first token among the gather tokens
    prefill_counts: torch.Tensor | None = None   # [P] int32
    prefill_past: torch.Tensor | None = None     # [P] int32

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])


def make_batch(plan: ForwardPlan, device: torch.device, block_size: int, split_decode: bool = True,
               prefill_in_place: bool = False) -> ForwardBatch:
    """Flatten the plan's tokens and compute on the host (numpy) where each goes in the pool and what it reads.

    `split_decode` False sends every row through the gather path (the CPU path: one SDPA for all rows);
    `prefill_in_place` runs the other rows with the paged prefill kernel instead of the gather path.
    """
    counts = np.array([len(t) for t in plan.tokens], dtype=np.int64)
    past = np.array(plan.past_lengths, dtype=np.int64)
    rows = len(counts)
    starts = np.cumsum(counts) - counts
    total_tokens = int(counts.sum())
    width = max(len(t) for t in plan.block_tables)
    tables = np.zeros((rows, max(1, width)), dtype=np.int64)
    for row, table in enumerate(plan.block_tables):
        tables[row, :len(table)] = table
    row_of = np.repeat(np.arange(rows), counts)
    positions = np.arange(total_tokens) - np.repeat(starts, counts) + np.repeat(past, counts)
    slots = tables[row_of, positions // block_size] * block_size + positions % block_size

    def tensor(values: np.ndarray, dtype: torch.dtype = torch.long) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(values)).to(device=device, dtype=dtype, non_blocking=True)

    flat_tokens = [t for row in plan.tokens for t in row]
    decode = plan.num_decode if split_decode else 0
    batch = ForwardBatch(
        token_ids=torch.tensor(flat_tokens, dtype=torch.long).to(device, non_blocking=True),
        positions=tensor(positions), slot_mapping=tensor(slots), last_index=tensor(starts + counts - 1),
        num_rows=rows, num_decode=decode)
    if decode:
        batch.decode_tables = tensor(tables[:decode], torch.int32)
        batch.decode_lengths = tensor(past[:decode] + 1, torch.int32)
    if decode == rows:
        return batch
    g_counts, g_past, g_tables = counts[decode:], past[decode:], tables[decode:]
    g_rows = rows - decode
    g_width = int(g_counts.max())
    g_starts = np.cumsum(g_counts) - g_counts
    batch.gather_rows, batch.gather_width = g_rows, g_width
    if prefill_in_place:
        batch.prefill_in_place = True
        batch.prefill_tables = tensor(g_tables, torch.int32)
        batch.prefill_starts = tensor(g_starts, torch.int32)
        batch.prefill_counts = tensor(g_counts, torch.int32)
        batch.prefill_past = tensor(g_past, torch.int32)
        return batch
    columns = np.minimum(np.arange(g_width)[None, :], g_counts[:, None] - 1)
    totals = g_past + g_counts
    batch.query_index = tensor(g_starts[:, None] + columns)
    batch.query_positions = tensor(g_past[:, None] + columns)
    batch.key_lengths = tensor(totals)
    g_total = int(g_counts.sum())
    g_row_of = np.repeat(np.arange(g_rows), g_counts)
    batch.output_index = tensor(g_row_of * g_width + np.arange(g_total) - np.repeat(g_starts, g_counts))
    if int(g_past.max()) > 0:
        keys = -(-int(totals.max()) // _KEY_LENGTH_BUCKET) * _KEY_LENGTH_BUCKET
        key_positions = np.arange(keys)
        blocks = g_tables[:, np.minimum(key_positions // block_size, g_tables.shape[1] - 1)]
        key_slots = blocks * block_size + key_positions % block_size
        batch.key_slots = tensor(np.where(key_positions[None, :] < totals[:, None], key_slots, 0))
    return batch

def _dequantize(weight: torch.Tensor, scale: torch.Tensor, precision: str) -> torch.Tensor:
    """Weight-only int8/int4 `[in, out]` (or `[E, in, out]`) -> float `[out, in]` (`[E, out, in]`)."""
    if weight.dim() == 3:
        return torch.stack([dequantize_weight(weight[e], scale[e], precision) for e in range(weight.shape[0])])
    return dequantize_weight(weight, scale, precision)


class DecoderModel:
    """The layers, embedding and head that one rank holds, plus the forward over its KV cache."""

    def __init__(self, config: EngineConfig, engine_dir: Path, comm: Communicator,
                 device: torch.device, weights: dict[str, torch.Tensor] | None = None) -> None:
        """`weights`: this rank's tensors in the engine dir's layout (e.g. made on the device by a benchmark),
        read instead of `rank{r}.safetensors`; the model takes them over (the dict is emptied)."""
        self.config = config
        self.comm = comm
        self.device = device
        self.mapping = comm.mapping
        self.dtype = config.dtype
        self.heads = config.heads_per_rank()
        self.kv_heads = config.kv_heads_per_rank()
        self.head_size = config.head_size
        self.layer_ids = self.mapping.pp_layers(config.num_layers)
        self.tensors = self._load(Path(engine_dir) / f"rank{self.mapping.rank}.safetensors", weights)
        self._check_shapes()
        self.dense = DecodeGemm(device, self.dtype)  # float linears: cuBLAS, or our kernel where it measured faster
        start = self.mapping.tp_rank * self.heads
        self.slopes = (alibi_slopes(config.num_heads, config.alibi_bias_max)[start:start + self.heads]
                       .to(device) if config.position_embedding_type == "alibi" else None)
        rotary_dim = int(config.pretrained_config.get("rotary_embedding_dim")
                         or round(self.head_size * float(config.pretrained_config.get("rotary_pct", 1.0))))
        self.rotary_dim = rotary_dim
        self.inv_freq = (1.0 / (config.rotary_base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float)
                                                        / rotary_dim))).to(device)
        self.kv_scales: list[float] | None = None
        if config.kv_cache_quant_algo == "INT8":
            self.kv_scales = [float(self._layer(i, "attention.kv_cache_scaling_factor").float().reshape(-1)[0])
                              for i in range(len(self.layer_ids))]

    # loading ---------------------------------------------------------------------------------------------
    def _load(self, path: Path, weights: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The rank's tensors on the device, from `path` or, when given, popped from `weights` (so no tensor is
        held twice). Weight-only int8/int4 GEMM weights stay quantized: they go to `self.weight_only`
        (converted once for their kernel) and `tensors` holds a meta-device placeholder of the float shape, so
        shape checks still read it. `GEN_REPO_WEIGHT_ONLY_KERNEL=load` dequantizes at load instead (the old
        behaviour, kept as a reference)."""
        if weights is None and not path.is_file():
            raise ConfigError(f"{path} not found: the engine dir has no weights for rank {self.mapping.rank}")
        precision = weight_only_precision(self.config.quant_algo)
        at_load = os.environ.get(KERNEL_ENV) == "load"
        self.weight_only: dict[str, WeightOnlyLinear | QuantizedExperts] = {}
        tensors: dict[str, torch.Tensor] = {}
        get: Callable[[str], torch.Tensor]
        with contextlib.ExitStack() as stack:
            if weights is None:
                handle = stack.enter_context(safe_open(str(path), framework="pt"))
                names, get = list(handle.keys()), handle.get_tensor
            else:
                names, get = list(weights), weights.pop
            for name in names:
                if name.endswith(".per_channel_scale"):
                    continue
                tensor = get(name)
                scale_name = name[: -len(".weight")] + ".per_channel_scale"
                quantized: tuple[torch.Tensor, torch.Tensor] | None = None
                if precision and tensor.dtype == torch.int8 and scale_name in names:
                    quantized = (tensor, get(scale_name))
                elif precision and tensor.is_floating_point() and is_weight_only_target(name):
                    # float weights with quant_algo set: quantized at build time, as trtllm-build does
                    quantized = quantize_weight(tensor.to(self.dtype), precision)
                if quantized is not None and precision and not at_load:
                    tensors[name] = self._keep_quantized(name, *quantized, precision)
                    continue
                if quantized is not None and precision:
                    tensor = _dequantize(*quantized, precision)
                tensors[name] = tensor.to(device=self.device, dtype=stored_dtype(name, self.dtype))
        return tensors

    def _keep_quantized(self, name: str, weight: torch.Tensor, scale: torch.Tensor, precision: str) -> torch.Tensor:
        """Register the weight-only linear(s) for `name`; return the float-shaped meta placeholder."""
        outputs = scale.shape[-1]
        if weight.dim() == 3:  # experts [E, in, out]: fc as one GEMM over all experts, proj one per expert
            self.weight_only[name] = expert_linears(weight, scale, precision, self.dtype, self.device,
                                                    concatenate=name.endswith("mlp.fc.weight"))
            shape: tuple[int, ...] = (weight.shape[0], outputs, weight.shape[1])
        else:
            self.weight_only[name] = weight_only_linear(weight, scale, precision, self.dtype, self.device)
            shape = (outputs, weight.shape[0])
        return torch.empty(shape, dtype=self.dtype, device="meta")

    def weight_bytes(self) -> int:
        """Bytes of weights this rank holds on its device (quantized weights at their packed size)."""
        total = sum(t.numel() * t.element_size() for t in self.tensors.values() if t.device.type != "meta")
        return total + sum(value.nbytes for value in self.weight_only.values())

    def _layer(self, local_layer: int, name: str) -> torch.Tensor:
        return self.tensors[f"transformer.layers.{local_layer}.{name}"]

    def _optional(self, name: str) -> torch.Tensor | None:
        return self.tensors.get(name)

    def _check_shapes(self) -> None:
        qkv_rows = (self.heads + 2 * self.kv_heads) * self.head_size
        for local in range(len(self.layer_ids)):
            name = f"transformer.layers.{local}.attention.qkv.weight"
            if name not in self.tensors:
                raise ConfigError(f"rank {self.mapping.rank}: tensor {name} is missing")
            rows = self.tensors[name].shape[0]
            if rows != qkv_rows:
                raise ConfigError(f"rank {self.mapping.rank}: {name} has {rows} rows, expected {qkv_rows} "
                                  f"(({self.heads} heads + 2 x {self.kv_heads} KV heads) x head size "
                                  f"{self.head_size})")
        if self.mapping.is_first_pp_rank and "transformer.vocab_embedding.weight" not in self.tensors:
            raise ConfigError(f"rank {self.mapping.rank}: transformer.vocab_embedding.weight is missing")
        if self.mapping.is_last_pp_rank and "lm_head.weight" not in self.tensors:
            if "transformer.vocab_embedding.weight" not in self.tensors:
                raise ConfigError(f"rank {self.mapping.rank}: lm_head.weight is missing")

    # forward pieces --------------------------------------------------------------------------------------
    def _norm(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.tensors[prefix + ".weight"],
                            self._optional(prefix + ".bias"), self.config.norm_epsilon)

    def _matmul(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """`x @ W^T` for the float or weight-only quantized weight `name`."""
        quantized = self.weight_only.get(name)
        if isinstance(quantized, WeightOnlyLinear):
            return quantized(x)
        return self.dense(x, self.tensors[name])

    def _linear(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        out = self._matmul(x, prefix + ".weight")
        bias = self._optional(prefix + ".bias")
        return out + bias if bias is not None else out

    def _row_linear(self, x: torch.Tensor, prefix: str, reduce: bool = True) -> torch.Tensor:
        """Row-parallel linear: partial products summed over TP, then the bias once; with `reduce=False` this
        rank's partial product (for the caller's fused all-reduce, so no bias)."""
        out = self._matmul(x, prefix + ".weight")
        bias = self._optional(prefix + ".bias")
        if not reduce:
            assert bias is None, "a partial sum cannot carry the bias"
            return out
        out = self.comm.tp_all_reduce(out)
        return out + bias if bias is not None else out

    def embed(self, batch: ForwardBatch) -> torch.Tensor:
        table = self.tensors["transformer.vocab_embedding.weight"]
        ids = batch.token_ids
        tp = self.mapping.tensor_parallel_size
        if table.shape[0] < self.config.vocab_size and tp > 1:
            # vocab-sharded table: each rank looks up the ids it holds and the sum fills in the rest
            start = self.mapping.tp_rank * table.shape[0]
            local = ids - start
            inside = (local >= 0) & (local < table.shape[0])
            hidden = F.embedding(local.clamp(0, table.shape[0] - 1), table) * inside[..., None].to(table.dtype)
            hidden = self.comm.tp_all_reduce(hidden)
        elif table.shape[1] < self.config.hidden_size and tp > 1:
            hidden = self.comm.tp_all_gather(F.embedding(ids, table), dim=-1)
        else:
            hidden = F.embedding(ids, table)
        positions = self._optional("transformer.position_embedding.weight")
        if positions is not None:
            hidden = hidden + F.embedding(batch.positions, positions)
        return hidden

    def _attention_bias(self, batch: ForwardBatch) -> torch.Tensor:
        """Additive mask of the gather rows `[P, heads or 1, Tq, K]`: causal + per-row length, plus ALiBi.

        ALiBi is `slope * (key position - last position)`, as HF MPT builds it (not scaled by 1/sqrt(hd)).
        """
        assert batch.query_positions is not None and batch.key_lengths is not None
        length = batch.key_slots.shape[1] if batch.key_slots is not None else batch.gather_width
        keys = torch.arange(length, device=self.device)
        queries = batch.query_positions
        totals = batch.key_lengths
        allowed = (keys[None, None, :] <= queries[:, :, None]) & (keys[None, None, :] < totals[:, None, None])
        bias = torch.zeros(allowed.shape, dtype=torch.float32, device=self.device)
        bias = bias.masked_fill(~allowed, float("-inf"))[:, None]
        if self.slopes is not None:
            relative = (keys[None, :] - (totals[:, None] - 1)).float()  # [P, K]
            bias = bias + self.slopes[None, :, None, None] * relative[:, None, None, :]
        return bias.to(self.dtype)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """GPT-NeoX rotate-half RoPE on the first `rotary_dim` channels of `x`: `[B, heads, T, hd]`."""
        rotary, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim:]
        half = self.rotary_dim // 2
        rotated = torch.cat((-rotary[..., half:], rotary[..., :half]), dim=-1)
        out = rotary * cos + rotated * sin
        return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out

    def _qk_norm(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        """LayerNorm over the whole q (or k) vector of all heads; with TP the statistics span every rank."""
        weight = self.tensors[prefix + ".weight"]
        bias = self._optional(prefix + ".bias")
        tp = self.mapping.tensor_parallel_size
        if tp == 1:
            return F.layer_norm(x, (x.shape[-1],), weight, bias, self.config.norm_epsilon)
        if weight.shape[0] != x.shape[-1]:  # a replicated full-width weight: take this rank's columns
            start = self.mapping.tp_rank * x.shape[-1]
            weight = weight[start:start + x.shape[-1]]
            bias = bias[start:start + x.shape[-1]] if bias is not None else None
        total = x.shape[-1] * tp
        xf = x.float()
        stats = torch.stack([xf.sum(-1), (xf * xf).sum(-1)], dim=-1)
        stats = self.comm.tp_all_reduce(stats)
        mean = stats[..., 0:1] / total
        var = stats[..., 1:2] / total - mean * mean
        out = ((xf - mean) * torch.rsqrt(var + self.config.norm_epsilon)).to(x.dtype) * weight
        return out + bias if bias is not None else out

    def _attention(self, local: int, x: torch.Tensor, batch: ForwardBatch, cache: KVPool,
                   bias: torch.Tensor | None, rope: tuple[torch.Tensor, torch.Tensor] | None,
                   reduce: bool = True) -> torch.Tensor:
        """The attention block's output; with `reduce=False` this rank's partial sum (no bias), for the caller's
        fused all-reduce."""
        prefix = f"transformer.layers.{local}.attention"
        tokens = x.shape[0]
        hd = self.head_size
        qkv = self._linear(x, prefix + ".qkv")
        if self.config.clip_qkv:
            qkv = qkv.clamp(-self.config.clip_qkv, self.config.clip_qkv)
        q, k, v = qkv.split([self.heads * hd, self.kv_heads * hd, self.kv_heads * hd], dim=-1)
        if prefix + ".q_layernorm.weight" in self.tensors:
            q = self._qk_norm(q, prefix + ".q_layernorm")
            k = self._qk_norm(k, prefix + ".k_layernorm")
        q = q.reshape(tokens, self.heads, hd)
        k = k.reshape(tokens, self.kv_heads, hd)
        v = v.reshape(tokens, self.kv_heads, hd)
        if rope is not None:
            q, k = self._rope(q, *rope), self._rope(k, *rope)
        cache.write(local, batch.slot_mapping, k, v)
        parts = []
        decode = batch.num_decode
        if decode:
            assert batch.decode_tables is not None and batch.decode_lengths is not None
            key_blocks, value_blocks = cache.blocks(local)
            out = decode_attention(q[:decode], key_blocks, value_blocks, batch.decode_tables, batch.decode_lengths,
                                   self.slopes, cache.scale(local))
            parts.append(out.reshape(decode, self.heads * hd))
        if batch.prefill_in_place:
            assert batch.prefill_tables is not None and batch.prefill_starts is not None
            assert batch.prefill_counts is not None and batch.prefill_past is not None
            key_blocks, value_blocks = cache.blocks(local)
            out = paged_prefill_attention(q[decode:], key_blocks, value_blocks, batch.prefill_tables,
                                          batch.prefill_starts, batch.prefill_counts, batch.prefill_past,
                                          batch.gather_width, self.slopes, cache.scale(local))
            parts.append(out.reshape(-1, self.heads * hd))
        elif batch.gather_rows:
            assert batch.query_index is not None and batch.output_index is not None
            queries = q[decode:][batch.query_index].transpose(1, 2)     # [P, heads, Tq, hd]
            if batch.key_slots is None:  # nothing cached: the new K/V are the whole sequences
                keys, values = k[decode:][batch.query_index], v[decode:][batch.query_index]
            else:
                keys, values = cache.gather(local, batch.key_slots)     # [P, K, kv, hd]
            gqa = {"enable_gqa": True} if self.kv_heads != self.heads else {}
            with sdpa_kernel(ATTENTION_BACKENDS):
                out = F.scaled_dot_product_attention(queries, keys.transpose(1, 2), values.transpose(1, 2),
                                                     attn_mask=bias, scale=1.0 / math.sqrt(hd), **gqa)
            out = out.transpose(1, 2).reshape(-1, self.heads * hd)[batch.output_index]
            parts.append(out)
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        return self._row_linear(out, prefix + ".dense", reduce)

    def _mlp(self, local: int, x: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        """The MLP (or MoE) block's output; with `reduce=False` this rank's partial sum (no bias)."""
        prefix = f"transformer.layers.{local}.mlp"
        if self.config.moe is not None:
            return self._moe(local, x, reduce)
        fc = prefix + ".fc"
        if self.config.hidden_act == "gelu":  # exact erf GELU, as HF MPT
            if fc + ".bias" in self.tensors or fc + ".weight" in self.weight_only:
                hidden = F.gelu(self._linear(x, fc))
            else:  # in the GEMM's epilogue where DecodeGemm takes the shape
                hidden = self.dense(x, self.tensors[fc + ".weight"], gelu=True)
        else:  # swiglu: fc holds [up; gate]
            hidden = self._linear(x, fc)
            up, gate = hidden.chunk(2, dim=-1)
            hidden = F.silu(gate) * up
        return self._row_linear(hidden, prefix + ".proj", reduce)

    def _moe(self, local: int, x: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        """Top-k routing in float32 on every rank; each rank runs its experts' share of F (no host sync, see
        engine/moe.py), then one all-reduce (with `reduce=False` the caller's)."""
        moe = self.config.moe
        assert moe is not None
        prefix = f"transformer.layers.{local}.mlp"
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        weights, chosen = route(tokens, self.tensors[prefix + ".router.weight"], moe.top_k, moe.normalize_p)
        fc, proj = self.tensors[prefix + ".fc.weight"], self.tensors[prefix + ".proj.weight"]
        count = fc.shape[0]  # [E_local, 2 F_local, d]: up rows, then gate rows; proj [E_local, d, F_local]
        experts = Experts(first=self.mapping.moe_ep_rank * count, count=count)
        fc_quantized, proj_quantized = self.weight_only.get(prefix + ".fc.weight"), self.weight_only.get(
            prefix + ".proj.weight")
        if isinstance(fc_quantized, QuantizedExperts) and isinstance(proj_quantized, QuantizedExperts):
            experts.fc_quantized, experts.proj_quantized = fc_quantized, proj_quantized
        else:
            experts.fc, experts.proj = fc, proj
        partial = moe_forward(tokens, weights, chosen, experts)
        return (self.comm.tp_all_reduce(partial) if reduce else partial).reshape(shape)

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        """ln_f + vocab-parallel lm_head -> float32 logits `[B, vocab_size]`."""
        hidden = self._norm(hidden, "transformer.ln_f")
        weight = self.tensors.get("lm_head.weight", self.tensors.get("transformer.vocab_embedding.weight"))
        assert weight is not None
        logits = self.dense(hidden, weight)
        if weight.shape[0] < self.config.vocab_size:  # gathered in the model's dtype: half of float32's bytes
            logits = self.comm.tp_all_gather(logits, dim=-1)
        return logits[:, : self.config.vocab_size].float()

    # the forward ----------------------------------------------------------------------------------------
    @property
    def moe_graph_safe(self) -> bool:
        """MoE layers run without host syncs (CUDA-graph capturable) unless the reference loop is forced."""
        return os.environ.get(METHOD_ENV) != "loop"

    @property
    def fused_norm(self) -> bool:
        """Whether forward fuses the residual adds into the LayerNorms (CUDA, see attention.add_layer_norm)."""
        return fused_norm_available(self.device) and len(self.layer_ids) > 0

    def forward(self, batch: ForwardBatch, cache: KVPool) -> torch.Tensor | None:
        """Run this rank's stage; returns the float32 logits of each row's last new token on rank 0 (else None)."""
        tokens = batch.num_tokens
        d = self.config.hidden_size
        comm = self.comm
        if self.mapping.is_first_pp_rank:
            hidden = self.embed(batch)
        else:
            hidden = comm.recv_from_previous_stage((tokens, d), self.dtype)
        bias = self._attention_bias(batch) if batch.gather_rows and not batch.prefill_in_place else None
        rope = None
        if self.config.position_embedding_type.startswith("rope"):
            freqs = batch.positions[:, None].float() * self.inv_freq  # [N, rotary/2]
            angles = torch.cat((freqs, freqs), dim=-1)[:, None]       # [N, 1, rotary]
            rope = (angles.cos().to(self.dtype), angles.sin().to(self.dtype))
        if self.fused_norm:
            hidden = self._fused_layers(hidden, batch, cache, bias, rope)
        else:
            for local in range(len(self.layer_ids)):
                prefix = f"transformer.layers.{local}"
                hidden = hidden + self._attention(local, self._norm(hidden, prefix + ".input_layernorm"), batch,
                                                  cache, bias, rope)
                hidden = hidden + self._mlp(local, self._norm(hidden, prefix + ".post_layernorm"))
        if not self.mapping.is_last_pp_rank:
            comm.send_to_next_stage(hidden)
            logits = None
        else:
            logits = self._head(hidden[batch.last_index])
        if self.mapping.pipeline_parallel_size > 1:
            source = comm.logits_source_rank()
            if self.mapping.rank == source and source != 0:
                assert logits is not None
                comm.send_logits_to_leader(logits)
            elif self.mapping.rank == 0:
                logits = comm.recv_logits((batch.num_rows, self.config.vocab_size))
        return logits if self.mapping.rank == 0 else None

    def _fused_layers(self, hidden: torch.Tensor, batch: ForwardBatch, cache: KVPool, bias: torch.Tensor | None,
                      rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """The layers with each residual add fused into the LayerNorm after it (the same arithmetic), and with
        TP the all-reduce before it too, where the communicator has the fused kernel (`_reduce_add_norm`)."""
        count = len(self.layer_ids)
        normed = self._norm(hidden, "transformer.layers.0.input_layernorm")
        for local in range(count):
            prefix = f"transformer.layers.{local}"
            fused = self._fusable(prefix + ".attention.dense.bias")
            partial = self._attention(local, normed, batch, cache, bias, rope, reduce=not fused)
            hidden, mlp_input = self._reduce_add_norm("attention", fused, partial, hidden,
                                                      prefix + ".post_layernorm")
            assert mlp_input is not None
            fused = self._fusable(prefix + ".mlp.proj.bias")
            partial = self._mlp(local, mlp_input, reduce=not fused)
            # ln_f runs on the last tokens only (in _head): the last layer adds without a norm
            norm = f"transformer.layers.{local + 1}.input_layernorm" if local + 1 < count else None
            hidden, next_input = self._reduce_add_norm("mlp", fused, partial, hidden, norm)
            if next_input is not None:
                normed = next_input
        return hidden

    def _fusable(self, row_bias: str) -> bool:
        """Whether a block's output all-reduce goes into the fused kernel: the communicator has it, and no bias
        (`row_bias`) is added after the sum. The block then returns its partial sum."""
        return self.comm.peer_norm is not None and row_bias not in self.tensors

    def _reduce_add_norm(self, role: str, fused: bool, update: torch.Tensor, residual: torch.Tensor,
                         norm: str | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(residual + the block's output, the LayerNorm `norm` of that or None). With `fused`, `update` is this
        rank's partial sum: the fused kernel sums it over TP, or NCCL does for a message too big for it."""
        weight = self.tensors[norm + ".weight"] if norm else None
        norm_bias = self._optional(norm + ".bias") if norm else None
        eps = self.config.norm_epsilon
        if fused:
            peer_norm = self.comm.peer_norm
            assert peer_norm is not None
            if peer_norm.fits(update):
                return peer_norm(role, update, residual, weight, norm_bias, eps)
            update = self.comm.tp_all_reduce(update)
        if weight is None:
            return residual + update, None
        return add_layer_norm(update, residual, weight, norm_bias, eps)

    def kv_token_bytes(self) -> int:
        """Bytes one token's K and V take in this rank's pool."""
        return bytes_per_token(len(self.layer_ids), self.kv_heads, self.head_size,
                               1 if self.kv_scales is not None else self.dtype.itemsize)

    def new_cache(self, num_blocks: int, block_size: int) -> KVPool:
        """The rank's KV pool of `num_blocks` blocks for its layers and KV heads."""
        return KVPool(len(self.layer_ids), num_blocks, block_size, self.kv_heads, self.head_size, self.dtype,
                      self.device, self.kv_scales)
