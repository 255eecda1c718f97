"""Attention over the paged KV pool.

Decode rows (one new token each) read their keys and values straight from the pool blocks through their block
tables: on CUDA with a Triton-language kernel (one program per sequence and query head, an online softmax over
tiles of keys gathered through the block table, GQA/MQA by head grouping, ALiBi from the slopes, int8 K/V
dequantized on load; with few sequences and wide tables each (sequence, head)'s keys are split over several
programs and merged by a second kernel, see `decode_splits`); elsewhere with `decode_attention_reference`, which
gathers the padded table's slots and runs SDPA (the CPU path and the kernel's correctness reference). Both have fixed shapes for a fixed table width,
so they can be captured in CUDA graphs. RoPE is applied before K is written, so the pool holds rotated keys.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

try:  # part of torch's CUDA wheels; absent on CPU-only installs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

# cuDNN's SDPA builds a new plan for every key length (one more each decode step): tens of ms per call
ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def prefill_kernel_available(device: torch.device) -> bool:
    """The prefill kernel goes with the decode kernel; GEN_REPO_PAGED_PREFILL=0 keeps SDPA over gathered keys."""
    return kernel_available(device) and os.environ.get("GEN_REPO_PAGED_PREFILL", "1") != "0"


def fused_norm_available(device: torch.device) -> bool:
    """The fused residual add + LayerNorm; GEN_REPO_FUSED_NORM=0 keeps torch's add and layer_norm."""
    return kernel_available(device) and os.environ.get("GEN_REPO_FUSED_NORM", "1") != "0"


def kernel_available(device: torch.device) -> bool:
    """The Triton kernel runs on CUDA (or anywhere under TRITON_INTERPRET=1); GEN_REPO_PAGED_KERNEL=0 turns it off."""
    if triton is None or os.environ.get("GEN_REPO_PAGED_KERNEL", "1") == "0":
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def decode_attention_reference(q: torch.Tensor, key_blocks: torch.Tensor, value_blocks: torch.Tensor,
                               tables: torch.Tensor, lengths: torch.Tensor, scale: float,
                               slopes: torch.Tensor | None, kv_scale: float | None) -> torch.Tensor:
    """`q` `[D, heads, hd]` against each row's first `lengths[i]` pool tokens -> `[D, heads, hd]` (q's dtype).

    `key_blocks`/`value_blocks`: `[num_blocks, block_size, kv_heads, hd]`; `tables`: `[D, W]` block ids.
    """
    rows, heads, hd = q.shape
    block_size = key_blocks.shape[1]
    width = tables.shape[1] * block_size
    slots = (tables.long()[:, :, None] * block_size + torch.arange(block_size, device=q.device)).reshape(rows, width)
    keys = key_blocks.flatten(0, 1)[slots]       # [D, K, kv, hd]
    values = value_blocks.flatten(0, 1)[slots]
    if kv_scale is not None:
        keys, values = keys.to(q.dtype) * kv_scale, values.to(q.dtype) * kv_scale
    positions = torch.arange(width, device=q.device)
    allowed = positions[None, :] < lengths.long()[:, None]                       # [D, K]
    bias = torch.zeros(allowed.shape, dtype=torch.float32, device=q.device).masked_fill(~allowed, float("-inf"))
    bias = bias[:, None, None, :]                                                 # [D, 1, 1, K]
    if slopes is not None:
        relative = (positions[None, :] - (lengths.long()[:, None] - 1)).float()
        bias = bias + slopes[None, :, None, None] * relative[:, None, None, :]
    gqa = {"enable_gqa": True} if keys.shape[2] != heads else {}
    with sdpa_kernel(ATTENTION_BACKENDS):
        out = F.scaled_dot_product_attention(q[:, :, None, :], keys.transpose(1, 2), values.transpose(1, 2),
                                             attn_mask=bias.to(q.dtype), scale=scale, **gqa)
    return out[:, :, 0, :]


if triton is not None:
    # the table's row stride follows the batch's widest table: specializing on it would recompile per width
    @triton.jit(do_not_specialize=["stride_table_row", "partition"])
    def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, lengths_ptr, slopes_ptr, out_ptr,
                             split_acc_ptr, split_stats_ptr, partition, scale, kv_scale,
                             stride_q_row, stride_q_head, stride_block, stride_slot, stride_kv_head,
                             stride_table_row, stride_out_row, stride_out_head,
                             GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                             BLOCK_D: tl.constexpr, TILE: tl.constexpr, HAS_ALIBI: tl.constexpr,
                             INT8: tl.constexpr, SPLIT: tl.constexpr):
        """One (row, query head) program over all its keys; with SPLIT, one (row, head, split) program over
        `partition` keys, writing its unnormalized sum and softmax statistics for `_combine_splits_kernel`."""
        row = tl.program_id(0)
        head = tl.program_id(1)
        kv_head = head // GROUP
        length = tl.load(lengths_ptr + row)
        first = 0
        end = length
        if SPLIT:
            split = tl.program_id(2)
            first = split * partition
            end = tl.minimum(length, first + partition)
        dims = tl.arange(0, BLOCK_D)
        dims_ok = dims < HEAD_DIM
        q = tl.load(q_ptr + row * stride_q_row + head * stride_q_head + dims, mask=dims_ok, other=0.0)
        q = q.to(tl.float32) * scale
        slope = 0.0
        if HAS_ALIBI:
            slope = tl.load(slopes_ptr + head).to(tl.float32)
        best = tl.zeros([1], dtype=tl.float32) - float("inf")
        total = tl.zeros([1], dtype=tl.float32)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        offsets = tl.arange(0, TILE)
        for start in range(first, end, TILE):
            positions = start + offsets
            valid = positions < end
            block = tl.load(tables_ptr + row * stride_table_row + positions // BLOCK_SIZE, mask=valid, other=0)
            base = block.to(tl.int64) * stride_block + (positions % BLOCK_SIZE) * stride_slot + kv_head * stride_kv_head
            both_ok = valid[:, None] & dims_ok[None, :]
            keys = tl.load(k_ptr + base[:, None] + dims[None, :], mask=both_ok, other=0.0).to(tl.float32)
            if INT8:
                keys = keys * kv_scale
            scores = tl.sum(keys * q[None, :], 1)
            if HAS_ALIBI:
                scores += slope * (positions - (length - 1)).to(tl.float32)
            scores = tl.where(valid, scores, float("-inf"))
            new_best = tl.maximum(best, tl.max(scores, 0))
            weights = tl.exp(scores - new_best)
            correction = tl.exp(best - new_best)
            values = tl.load(v_ptr + base[:, None] + dims[None, :], mask=both_ok, other=0.0).to(tl.float32)
            if INT8:
                values = values * kv_scale
            total = total * correction + tl.sum(weights, 0)
            acc = acc * correction + tl.sum(weights[:, None] * values, 0)
            best = new_best
        if SPLIT:  # an empty split (past the row's length) writes best -inf, total 0
            index = (row * tl.num_programs(1) + head) * tl.num_programs(2) + split
            tl.store(split_acc_ptr + index * BLOCK_D + dims, acc)
            pair = tl.arange(0, 2)
            tl.store(split_stats_ptr + index * 2 + pair, tl.where(pair == 0, tl.sum(best, 0), tl.sum(total, 0)))
        else:
            out = acc / total
            tl.store(out_ptr + row * stride_out_row + head * stride_out_head + dims,
                     out.to(out_ptr.dtype.element_ty), mask=dims_ok)

    @triton.jit(do_not_specialize=["partition", "splits"])
    def _combine_splits_kernel(split_acc_ptr, split_stats_ptr, lengths_ptr, out_ptr, partition, splits,
                               stride_out_row, stride_out_head, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
        """The splits of one (row, head) merged as flash-decoding does: rescale each to the largest maximum."""
        row = tl.program_id(0)
        head = tl.program_id(1)
        used = tl.cdiv(tl.load(lengths_ptr + row), partition)  # splits past the length are empty
        base = (row * tl.num_programs(1) + head) * splits
        dims = tl.arange(0, BLOCK_D)
        best = tl.load(split_stats_ptr + base * 2)  # split 0 is never empty (length >= 1)
        for split in range(1, used):
            best = tl.maximum(best, tl.load(split_stats_ptr + (base + split) * 2))
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        total = tl.zeros([BLOCK_D], dtype=tl.float32)  # the same in every lane
        for split in range(0, used):
            weight = tl.exp(tl.load(split_stats_ptr + (base + split) * 2) - best)
            total += weight * tl.load(split_stats_ptr + (base + split) * 2 + 1)
            acc += weight * tl.load(split_acc_ptr + (base + split) * BLOCK_D + dims)
        tl.store(out_ptr + row * stride_out_row + head * stride_out_head + dims,
                 (acc / total).to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)


    @triton.jit
    def _store_kv_kernel(k_ptr, v_ptr, slots_ptr, k_pool_ptr, v_pool_ptr,
                         stride_k_row, stride_k_head, stride_v_row, stride_v_head, stride_slot, stride_pool_head,
                         KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
                         BLOCK_D: tl.constexpr):
        row = tl.program_id(0)
        slot = tl.load(slots_ptr + row).to(tl.int64)
        heads = tl.arange(0, BLOCK_H)
        dims = tl.arange(0, BLOCK_D)
        mask = (heads < KV_HEADS)[:, None] & (dims < HEAD_DIM)[None, :]
        target = slot * stride_slot + heads[:, None] * stride_pool_head + dims[None, :]
        keys = tl.load(k_ptr + row * stride_k_row + heads[:, None] * stride_k_head + dims[None, :], mask=mask)
        tl.store(k_pool_ptr + target, keys, mask=mask)
        values = tl.load(v_ptr + row * stride_v_row + heads[:, None] * stride_v_head + dims[None, :], mask=mask)
        tl.store(v_pool_ptr + target, values, mask=mask)


    @triton.jit(do_not_specialize=["stride_table_row"])
    def _paged_prefill_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, starts_ptr, counts_ptr, past_ptr, slopes_ptr, out_ptr,
                              scale, kv_scale,
                              stride_q_row, stride_q_head, stride_block, stride_slot, stride_kv_head,
                              stride_table_row, stride_out_row, stride_out_head,
                              GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                              BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              HAS_ALIBI: tl.constexpr, INT8: tl.constexpr, IEEE: tl.constexpr):
        sequence = tl.program_id(0)
        head = tl.program_id(1)
        tile = tl.program_id(2)
        count = tl.load(counts_ptr + sequence)
        if tile * BLOCK_M < count:
            start = tl.load(starts_ptr + sequence)
            past = tl.load(past_ptr + sequence)
            total = past + count
            kv_head = head // GROUP
            rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
            rows_ok = rows < count
            query_positions = past + rows
            dims = tl.arange(0, BLOCK_D)
            dims_ok = dims < HEAD_DIM
            q = tl.load(q_ptr + (start + rows)[:, None] * stride_q_row + head * stride_q_head + dims[None, :],
                        mask=rows_ok[:, None] & dims_ok[None, :], other=0.0)
            slope = 0.0
            if HAS_ALIBI:
                slope = tl.load(slopes_ptr + head).to(tl.float32)
            best = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
            weight_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
            acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
            offsets = tl.arange(0, BLOCK_N)
            end = tl.minimum(total, past + (tile + 1) * BLOCK_M)  # later keys are in every row's future
            for key_start in range(0, end, BLOCK_N):
                positions = key_start + offsets
                valid = positions < total
                block = tl.load(tables_ptr + sequence * stride_table_row + positions // BLOCK_SIZE, mask=valid,
                                other=0)
                base = (block.to(tl.int64) * stride_block + (positions % BLOCK_SIZE) * stride_slot
                        + kv_head * stride_kv_head)
                both_ok = valid[:, None] & dims_ok[None, :]
                keys = tl.load(k_ptr + base[:, None] + dims[None, :], mask=both_ok, other=0.0)
                values = tl.load(v_ptr + base[:, None] + dims[None, :], mask=both_ok, other=0.0)
                if INT8:
                    keys = (keys.to(tl.float32) * kv_scale).to(q.dtype)
                    values = (values.to(tl.float32) * kv_scale).to(q.dtype)
                if IEEE:
                    scores = tl.dot(q, tl.trans(keys), input_precision="ieee")
                else:
                    scores = tl.dot(q, tl.trans(keys))
                scores = scores * scale
                if HAS_ALIBI:
                    scores += slope * (positions - (total - 1)).to(tl.float32)[None, :]
                allowed = (positions[None, :] <= query_positions[:, None]) & valid[None, :]
                scores = tl.where(allowed, scores, float("-inf"))
                new_best = tl.maximum(best, tl.max(scores, 1))
                weights = tl.exp(scores - new_best[:, None])
                correction = tl.exp(best - new_best)
                weight_sum = weight_sum * correction + tl.sum(weights, 1)
                if IEEE:
                    update = tl.dot(weights.to(values.dtype), values, input_precision="ieee")
                else:
                    update = tl.dot(weights.to(values.dtype), values)
                acc = acc * correction[:, None] + update
                best = new_best
            out = acc / weight_sum[:, None]
            tl.store(out_ptr + (start + rows)[:, None] * stride_out_row + head * stride_out_head + dims[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=rows_ok[:, None] & dims_ok[None, :])


def paged_prefill_attention(q: torch.Tensor, key_blocks: torch.Tensor, value_blocks: torch.Tensor,
                            tables: torch.Tensor, starts: torch.Tensor, counts: torch.Tensor, past: torch.Tensor,
                            max_count: int, slopes: torch.Tensor | None, kv_scale: float | None) -> torch.Tensor:
    """Causal attention of prefill chunks over their blocks, in place (their own new K/V already written).

    `q`: `[M, heads, hd]`, the chunks' tokens one after the other; row `i` of `tables` (`[P, W]` int32) owns
    `q[starts[i]:starts[i] + counts[i]]`, at positions `past[i]...`. Returns `[M, heads, hd]`.
    """
    assert triton is not None
    tokens, heads, hd = q.shape
    out = torch.empty_like(q)
    rows = tables.shape[0]
    if tokens == 0 or rows == 0:
        return out
    block_m = 16 if max_count <= 16 else 32
    grid = (rows, heads, triton.cdiv(max_count, block_m))
    _paged_prefill_kernel[grid](
        q, key_blocks, value_blocks, tables, starts, counts, past, slopes if slopes is not None else q, out,
        1.0 / math.sqrt(hd), kv_scale if kv_scale is not None else 1.0,
        q.stride(0), q.stride(1), key_blocks.stride(0), key_blocks.stride(1), key_blocks.stride(2),
        tables.stride(0), out.stride(0), out.stride(1),
        GROUP=heads // key_blocks.shape[2], BLOCK_SIZE=key_blocks.shape[1], HEAD_DIM=hd,
        BLOCK_D=max(16, triton.next_power_of_2(hd)), BLOCK_M=block_m, BLOCK_N=32,
        HAS_ALIBI=slopes is not None, INT8=kv_scale is not None, IEEE=q.dtype == torch.float32)
    return out


if triton is not None:
    @triton.jit
    def _add_layer_norm_kernel(x_ptr, residual_ptr, weight_ptr, bias_ptr, sum_ptr, out_ptr,
                               stride_x, stride_residual, stride_sum, stride_out, eps,
                               WIDTH: tl.constexpr, BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr):
        row = tl.program_id(0)
        columns = tl.arange(0, BLOCK)
        mask = columns < WIDTH
        x = tl.load(x_ptr + row * stride_x + columns, mask=mask, other=0.0)
        residual = tl.load(residual_ptr + row * stride_residual + columns, mask=mask, other=0.0)
        total = (x.to(tl.float32) + residual.to(tl.float32)).to(x.dtype)  # rounded as torch's add rounds
        tl.store(sum_ptr + row * stride_sum + columns, total, mask=mask)
        out = layer_norm_row(total, columns, mask, weight_ptr, bias_ptr, eps, WIDTH, HAS_BIAS)
        tl.store(out_ptr + row * stride_out + columns, out.to(x.dtype), mask=mask)

    @triton.jit
    def layer_norm_row(total, columns, mask, weight_ptr, bias_ptr, eps, WIDTH: tl.constexpr,
                       HAS_BIAS: tl.constexpr):
        """LayerNorm of one row `total` (masked past WIDTH) in float32; also the fused all-reduce's."""
        values = total.to(tl.float32)
        mean = tl.sum(values, 0) / WIDTH
        centered = tl.where(mask, values - mean, 0.0)
        variance = tl.sum(centered * centered, 0) / WIDTH
        out = centered * tl.rsqrt(variance + eps) * tl.load(weight_ptr + columns, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            out += tl.load(bias_ptr + columns, mask=mask, other=0.0).to(tl.float32)
        return out


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`total = x + residual` and `layer_norm(total)` in one kernel (`[N, d]`, unit stride along d): the
    residual stream and the next sublayer's input, two launches fewer per sublayer than add + norm."""
    assert triton is not None
    rows, width = x.shape
    total = torch.empty_like(x)
    out = torch.empty_like(x)
    if rows == 0:
        return total, out
    block = triton.next_power_of_2(width)
    _add_layer_norm_kernel[(rows,)](
        x, residual, weight, bias if bias is not None else weight, total, out, x.stride(0), residual.stride(0),
        total.stride(0), out.stride(0), eps, WIDTH=width, BLOCK=block, HAS_BIAS=bias is not None,
        num_warps=8 if block >= 2048 else 4)
    return total, out


def store_kv(keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor, key_pool: torch.Tensor,
             value_pool: torch.Tensor) -> None:
    """`key_pool[slots[i]] = keys[i]` and the same for values, in one kernel (float pools; `keys`: `[N, kv, hd]`
    with unit stride along hd, e.g. a view of the fused qkv output; pools: `[slots, kv, hd]` contiguous)."""
    assert triton is not None
    rows, kv_heads, hd = keys.shape
    if rows == 0:
        return
    _store_kv_kernel[(rows,)](
        keys, values, slots, key_pool, value_pool, keys.stride(0), keys.stride(1), values.stride(0),
        values.stride(1), key_pool.stride(0), key_pool.stride(1), KV_HEADS=kv_heads, HEAD_DIM=hd,
        BLOCK_H=triton.next_power_of_2(kv_heads), BLOCK_D=triton.next_power_of_2(hd))


def decode_launch(programs: int, head_dim: int = 128, split: bool = False) -> dict[str, int]:
    """Keys per iteration and warps of the decode kernel for `programs` programs (`split`: the keys of each
    (row, head) are split over several programs).

    Swept on an H200 (bench/bench_paged_attention.py --sweep, bf16, 16-32 heads of 128, 192-1024 tokens): with
    enough programs to fill the GPU, one warp each over 64 keys reads K/V at 3.7-4.2 TB/s (the old 4 warps: 2.3-3.2);
    with fewer, bigger tiles keep more loads in flight per program. Tiles shrink with wider heads, so a thread
    holds as many values as at head size 128."""
    scale = max(1, triton.next_power_of_2(head_dim) // 128) if triton is not None else 1
    if programs >= 1024 and not split:
        return {"TILE": 64 // scale, "num_warps": 1}
    return {"TILE": 256 // scale, "num_warps": 4}


_PARTITION = 256             # keys of one split (flash-decoding), rounded up to whole tiles
_SPLIT_MAX_PROGRAMS = 64     # rows x heads (on this rank) up to this many split their keys: batch 1-2 at 32 heads
_MAX_SPLIT_PROGRAMS = 16384  # beyond this many programs, each split covers more keys instead (most are empty)


def decode_splits(programs: int, capacity: int) -> int:
    """How many splits of the keys for `programs` (rows x query heads) programs whose tables hold up to
    `capacity` tokens. Only few programs (`_SPLIT_MAX_PROGRAMS`) with tables of 1,024 tokens or more split, one
    split per `_PARTITION` keys of the table: the host knows only the table's width (a CUDA graph's tables are as
    wide as the longest sequence allowed), so a short row leaves its last splits empty; they end at once, and the
    combining kernel reads only the splits a row used. Measured on an H200 at batch 1, split vs one program per
    (row, head): 8,192 keys 59.4 vs 203 us; 1,000 keys in a 32,768-token table 12.2 vs 21.3 us; but 192 keys in a
    2,048-token table 8.3 vs 6.4 us, which a batch-1 decode graph pays at every short context. With more
    programs, splitting gained little or lost. Eager steps (tables as wide as the batch's longest row) and graph
    steps may split the same row differently, and so round differently in the last bits."""
    if programs > _SPLIT_MAX_PROGRAMS or capacity < 1024:
        return 1
    return max(1, min(-(-capacity // _PARTITION), _MAX_SPLIT_PROGRAMS // programs))


def paged_decode_attention(q: torch.Tensor, key_blocks: torch.Tensor, value_blocks: torch.Tensor,
                           tables: torch.Tensor, lengths: torch.Tensor, scale: float,
                           slopes: torch.Tensor | None, kv_scale: float | None,
                           launch: dict[str, int] | None = None, splits: int | None = None) -> torch.Tensor:
    """The Triton kernel; same contract as `decode_attention_reference` (`tables`, `lengths`: int32).

    `launch` overrides `TILE`, `num_warps` and `num_stages`, `splits` the number of key splits
    (bench/bench_paged_attention.py --sweep)."""
    assert triton is not None
    rows, heads, hd = q.shape
    kv_heads = key_blocks.shape[2]
    block_size = key_blocks.shape[1]
    out = torch.empty_like(q)
    if rows == 0:
        return out
    capacity = tables.shape[1] * block_size
    splits = splits if splits is not None else decode_splits(rows * heads, capacity)
    partition = -(-capacity // splits)
    launch = {**decode_launch(rows * heads * splits, hd, split=splits > 1), **(launch or {})}
    block_d = triton.next_power_of_2(hd)
    partition = -(-partition // launch["TILE"]) * launch["TILE"]  # whole tiles per split
    split_acc = split_stats = q  # unused without splits
    if splits > 1:
        split_acc = torch.empty(rows * heads * splits * block_d, dtype=torch.float32, device=q.device)
        split_stats = torch.empty(rows * heads * splits * 2, dtype=torch.float32, device=q.device)
    _paged_decode_kernel[(rows, heads, splits)](
        q, key_blocks, value_blocks, tables, lengths, slopes if slopes is not None else q, out,
        split_acc, split_stats, partition, scale, kv_scale if kv_scale is not None else 1.0,
        q.stride(0), q.stride(1), key_blocks.stride(0), key_blocks.stride(1), key_blocks.stride(2),
        tables.stride(0), out.stride(0), out.stride(1),
        GROUP=heads // kv_heads, BLOCK_SIZE=block_size, HEAD_DIM=hd, BLOCK_D=block_d,
        HAS_ALIBI=slopes is not None, INT8=kv_scale is not None, SPLIT=splits > 1, **launch)
    if splits > 1:
        _combine_splits_kernel[(rows, heads)](split_acc, split_stats, lengths, out, partition, splits,
                                              out.stride(0), out.stride(1), HEAD_DIM=hd, BLOCK_D=block_d)
    return out


def decode_attention(q: torch.Tensor, key_blocks: torch.Tensor, value_blocks: torch.Tensor, tables: torch.Tensor,
                     lengths: torch.Tensor, slopes: torch.Tensor | None, kv_scale: float | None) -> torch.Tensor:
    """Paged decode attention with the kernel when it runs here, else the gather reference."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    if kernel_available(q.device):
        q = q if q.stride(-1) == 1 else q.contiguous()
        return paged_decode_attention(q, key_blocks, value_blocks, tables, lengths, scale, slopes, kv_scale)
    return decode_attention_reference(q, key_blocks, value_blocks, tables, lengths, scale, slopes, kv_scale)
