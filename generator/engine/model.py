"""The model runner: one rank's share of a generic decoder, driven only by the TensorRT-LLM checkpoint config.

Covers what MPT (ALiBi, clip_qkv, optional qk LayerNorm / learned positions / biases) and DBRX (RoPE, GQA,
mixture of experts) need. Numerics follow the Hugging Face reference implementations: exact-erf GELU,
LayerNorm, softmax in float32 inside attention, float32 router and logits.

One forward runs a padded batch `[B, T]` of new tokens for `B` cache slots, each with its own number of
cached positions, so the same code runs the context phase (T = prompt length, nothing cached) and the
generation phase (T = 1).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch.nn.attention import SDPBackend, sdpa_kernel

from generator.engine.config import EngineConfig, alibi_slopes
from generator.engine.distributed import Communicator
from generator.engine.kv_cache import KVCache
from generator.engine.moe import Experts, moe_forward, route
from generator.engine.weight_only import (
    KERNEL_ENV,
    QuantizedExperts,
    WeightOnlyLinear,
    expert_linears,
    weight_only_linear,
)
from generator.errors import ConfigError
from generator.quantize import dequantize_weight, is_weight_only_target, quantize_weight

# cuDNN's SDPA builds a new plan for every key length (one more each decode step): tens of ms per call
_ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# keys read from the cache are padded to a multiple of this (masked), so kernels see few distinct shapes
_KEY_LENGTH_BUCKET = 16


@dataclass(frozen=True)
class ForwardPlan:
    """What every rank runs in one forward: new tokens per slot and how many positions each slot has cached.

    Rank 0 builds it and broadcasts it; it is plain Python so it pickles cheaply.
    """

    slots: list[int]
    tokens: list[list[int]]
    past_lengths: list[int]


@dataclass
class ForwardBatch:
    """A `ForwardPlan` as tensors on the rank's device."""

    token_ids: torch.Tensor        # [B, T] long, right-padded with 0
    positions: torch.Tensor        # [B, T] long: past + t
    past_lengths: torch.Tensor     # [B]
    total_lengths: torch.Tensor    # [B]: past + new
    last_index: torch.Tensor       # [B]: index of each row's last new token
    slot_index: torch.Tensor | slice
    write_slots: torch.Tensor      # [N] slot of each real (non-padding) new token
    write_positions: torch.Tensor  # [N] its position
    write_rows: torch.Tensor       # [N] its row in the batch
    write_cols: torch.Tensor       # [N] its column in the batch
    max_total: int
    nothing_cached: bool

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.token_ids.shape[0]), int(self.token_ids.shape[1])


def make_batch(plan: ForwardPlan, device: torch.device) -> ForwardBatch:
    """Pad the plan's token lists and precompute, on the host, where each real token goes in the cache."""
    batch = len(plan.slots)
    new_lengths = [len(t) for t in plan.tokens]
    width = max(new_lengths)
    padded = [t + [0] * (width - len(t)) for t in plan.tokens]
    rows, cols, write_slots, write_positions = [], [], [], []
    for row, (slot, cached, count) in enumerate(zip(plan.slots, plan.past_lengths, new_lengths, strict=True)):
        rows += [row] * count
        cols += list(range(count))
        write_slots += [slot] * count
        write_positions += list(range(cached, cached + count))
    totals = [p + n for p, n in zip(plan.past_lengths, new_lengths, strict=True)]

    def tensor(values: list[int] | list[list[int]]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)

    past_tensor = tensor(plan.past_lengths)
    contiguous = plan.slots == list(range(batch))
    return ForwardBatch(
        token_ids=tensor(padded),
        positions=past_tensor[:, None] + torch.arange(width, device=device)[None, :],
        past_lengths=past_tensor,
        total_lengths=tensor(totals),
        last_index=tensor([n - 1 for n in new_lengths]),
        slot_index=slice(0, batch) if contiguous else tensor(plan.slots),
        write_slots=tensor(write_slots), write_positions=tensor(write_positions),
        write_rows=tensor(rows), write_cols=tensor(cols),
        max_total=max(totals), nothing_cached=max(plan.past_lengths) == 0)


def _dequantize(weight: torch.Tensor, scale: torch.Tensor, precision: str) -> torch.Tensor:
    """Weight-only int8/int4 `[in, out]` (or `[E, in, out]`) -> float `[out, in]` (`[E, out, in]`)."""
    if weight.dim() == 3:
        return torch.stack([dequantize_weight(weight[e], scale[e], precision) for e in range(weight.shape[0])])
    return dequantize_weight(weight, scale, precision)


class DecoderModel:
    """The layers, embedding and head that one rank holds, plus the forward over its KV cache."""

    def __init__(self, config: EngineConfig, engine_dir: Path, comm: Communicator,
                 device: torch.device) -> None:
        self.config = config
        self.comm = comm
        self.device = device
        self.mapping = comm.mapping
        self.dtype = config.dtype
        self.heads = config.heads_per_rank()
        self.kv_heads = config.kv_heads_per_rank()
        self.head_size = config.head_size
        self.layer_ids = self.mapping.pp_layers(config.num_layers)
        self.tensors = self._load(Path(engine_dir) / f"rank{self.mapping.rank}.safetensors")
        self._check_shapes()
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
    def _load(self, path: Path) -> dict[str, torch.Tensor]:
        """The rank's tensors on the device. Weight-only int8/int4 GEMM weights stay quantized: they go to
        `self.weight_only` (converted once for their kernel) and `tensors` holds a meta-device placeholder of
        the float shape, so shape checks still read it. `GEN_REPO_WEIGHT_ONLY_KERNEL=load` dequantizes at load
        instead (the old behaviour, kept as a reference)."""
        if not path.is_file():
            raise ConfigError(f"{path} not found: the engine dir has no weights for rank {self.mapping.rank}")
        precision = {"W8A16": "int8", "W4A16": "int4"}.get(self.config.quant_algo or "")
        at_load = os.environ.get(KERNEL_ENV) == "load"
        self.weight_only: dict[str, WeightOnlyLinear | QuantizedExperts] = {}
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt") as handle:
            names = list(handle.keys())
            for name in names:
                if name.endswith(".per_channel_scale"):
                    continue
                tensor = handle.get_tensor(name)
                scale_name = name[: -len(".weight")] + ".per_channel_scale"
                quantized: tuple[torch.Tensor, torch.Tensor] | None = None
                if precision and tensor.dtype == torch.int8 and scale_name in names:
                    quantized = (tensor, handle.get_tensor(scale_name))
                elif precision and tensor.is_floating_point() and is_weight_only_target(name):
                    # float weights with quant_algo set: quantized at build time, as trtllm-build does
                    quantized = quantize_weight(tensor.to(self.dtype), precision)
                if quantized is not None and precision and not at_load:
                    tensors[name] = self._keep_quantized(name, *quantized, precision)
                    continue
                if quantized is not None and precision:
                    tensor = _dequantize(*quantized, precision)
                keep_float32 = name.endswith("mlp.router.weight") or "kv_cache_" in name
                dtype = torch.float32 if keep_float32 else self.dtype
                tensors[name] = tensor.to(device=self.device, dtype=dtype)
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
        return F.linear(x, self.tensors[name])

    def _linear(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        out = self._matmul(x, prefix + ".weight")
        bias = self._optional(prefix + ".bias")
        return out + bias if bias is not None else out

    def _row_linear(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        """Row-parallel linear: partial products summed over TP, then the bias once."""
        out = self.comm.tp_all_reduce(self._matmul(x, prefix + ".weight"))
        bias = self._optional(prefix + ".bias")
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

    def _attention_bias(self, batch: ForwardBatch, length: int) -> torch.Tensor:
        """Additive mask `[B, heads or 1, T, length]`: causal + per-row length, plus ALiBi.

        ALiBi is `slope * (key position - last position)`, as HF MPT builds it (not scaled by 1/sqrt(hd)).
        """
        keys = torch.arange(length, device=self.device)
        queries = batch.positions
        allowed = (keys[None, None, :] <= queries[:, :, None]) & (keys[None, None, :] < batch.total_lengths[:, None,
                                                                                                          None])
        bias = torch.zeros(allowed.shape, dtype=torch.float32, device=self.device)
        bias = bias.masked_fill(~allowed, float("-inf"))[:, None]
        if self.slopes is not None:
            relative = (keys[None, :] - (batch.total_lengths[:, None] - 1)).float()  # [B, L]
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

    def _attention(self, local: int, x: torch.Tensor, batch: ForwardBatch, cache: KVCache,
                   bias: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        prefix = f"transformer.layers.{local}.attention"
        rows, width = batch.shape
        hd = self.head_size
        qkv = self._linear(x, prefix + ".qkv")
        if self.config.clip_qkv:
            qkv = qkv.clamp(-self.config.clip_qkv, self.config.clip_qkv)
        q, k, v = qkv.split([self.heads * hd, self.kv_heads * hd, self.kv_heads * hd], dim=-1)
        if prefix + ".q_layernorm.weight" in self.tensors:
            q = self._qk_norm(q, prefix + ".q_layernorm")
            k = self._qk_norm(k, prefix + ".k_layernorm")
        q = q.view(rows, width, self.heads, hd).transpose(1, 2)
        k = k.view(rows, width, self.kv_heads, hd).transpose(1, 2)
        v = v.view(rows, width, self.kv_heads, hd).transpose(1, 2)
        if rope is not None:
            q, k = self._rope(q, *rope), self._rope(k, *rope)
        new_k = k.transpose(1, 2)[batch.write_rows, batch.write_cols]   # [N, kv, hd]
        new_v = v.transpose(1, 2)[batch.write_rows, batch.write_cols]
        cache.write(local, batch.write_slots, batch.write_positions, new_k, new_v)
        if batch.nothing_cached:
            keys, values = k, v  # context phase: the new K/V are the whole sequence
        else:
            keys, values = cache.read(local, batch.slot_index, bias.shape[-1])
        gqa = {"enable_gqa": True} if self.kv_heads != self.heads else {}
        with sdpa_kernel(_ATTENTION_BACKENDS):
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, scale=1.0 / math.sqrt(hd), **gqa)
        out = out.transpose(1, 2).reshape(rows, width, self.heads * hd)
        return self._row_linear(out, prefix + ".dense")

    def _mlp(self, local: int, x: torch.Tensor) -> torch.Tensor:
        prefix = f"transformer.layers.{local}.mlp"
        if self.config.moe is not None:
            return self._moe(local, x)
        hidden = self._linear(x, prefix + ".fc")
        if self.config.hidden_act == "gelu":
            hidden = F.gelu(hidden)  # exact erf GELU, as HF MPT
        else:  # swiglu: fc holds [up; gate]
            up, gate = hidden.chunk(2, dim=-1)
            hidden = F.silu(gate) * up
        return self._row_linear(hidden, prefix + ".proj")

    def _moe(self, local: int, x: torch.Tensor) -> torch.Tensor:
        """Top-k routing in float32 on every rank; each rank runs its experts' share of F (no host sync, see
        engine/moe.py), then one all-reduce."""
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
        return self.comm.tp_all_reduce(moe_forward(tokens, weights, chosen, experts)).reshape(shape)

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        """ln_f + vocab-parallel lm_head -> float32 logits `[B, vocab_size]`."""
        hidden = self._norm(hidden, "transformer.ln_f")
        weight = self.tensors.get("lm_head.weight", self.tensors.get("transformer.vocab_embedding.weight"))
        assert weight is not None
        logits = F.linear(hidden, weight).float()
        if weight.shape[0] < self.config.vocab_size:
            logits = self.comm.tp_all_gather(logits, dim=-1)
        return logits[:, : self.config.vocab_size]

    # the forward ----------------------------------------------------------------------------------------
    def forward(self, batch: ForwardBatch, cache: KVCache) -> torch.Tensor | None:
        """Run this rank's stage; returns the float32 logits of each row's last new token on rank 0 (else None)."""
        rows, width = batch.shape
        d = self.config.hidden_size
        comm = self.comm
        if self.mapping.is_first_pp_rank:
            hidden = self.embed(batch)
        else:
            hidden = comm.recv_from_previous_stage((rows, width, d), self.dtype)
        if batch.nothing_cached:
            length = width
        else:
            length = min(-(-batch.max_total // _KEY_LENGTH_BUCKET) * _KEY_LENGTH_BUCKET, self.config.max_seq_len)
        bias = self._attention_bias(batch, length)
        rope = None
        if self.config.position_embedding_type.startswith("rope"):
            freqs = batch.positions[..., None].float() * self.inv_freq  # [B, T, rotary/2]
            angles = torch.cat((freqs, freqs), dim=-1)[:, None]
            rope = (angles.cos().to(self.dtype), angles.sin().to(self.dtype))
        for local in range(len(self.layer_ids)):
            prefix = f"transformer.layers.{local}"
            hidden = hidden + self._attention(local, self._norm(hidden, prefix + ".input_layernorm"), batch, cache,
                                              bias, rope)
            hidden = hidden + self._mlp(local, self._norm(hidden, prefix + ".post_layernorm"))
        if not self.mapping.is_last_pp_rank:
            comm.send_to_next_stage(hidden)
            logits = None
        else:
            last = hidden[torch.arange(rows, device=self.device), batch.last_index]
            logits = self._head(last)
        if self.mapping.pipeline_parallel_size > 1:
            source = comm.logits_source_rank()
            if self.mapping.rank == source and source != 0:
                assert logits is not None
                comm.send_logits_to_leader(logits)
            elif self.mapping.rank == 0:
                logits = comm.recv_logits((rows, self.config.vocab_size))
        return logits if self.mapping.rank == 0 else None

    def new_cache(self, extra_slots: int = 0) -> KVCache:
        """A KV cache sized by the engine's build limits for this rank's layers and KV heads (plus
        `extra_slots` scratch slots)."""
        slots = self.config.max_batch_size + extra_slots
        try:
            return KVCache(len(self.layer_ids), slots, self.kv_heads, self.config.max_seq_len, self.head_size,
                           self.dtype, self.device, self.kv_scales)
        except torch.cuda.OutOfMemoryError as error:
            per_slot = (2 * len(self.layer_ids) * self.kv_heads * self.config.max_seq_len * self.head_size
                        * (1 if self.kv_scales is not None else self.dtype.itemsize))
            raise ConfigError(f"the KV cache ({slots} slots x {per_slot / 2**30:.2f} GiB) does not fit on "
                              f"{self.device}: rebuild the engine with a smaller max_batch_size or max_seq_len"
                              ) from error
