"""CUDA graphs for the generation phase: one captured forward per (batch bucket, key-length bucket, slot mode).

A decode step launches ~15 kernels per layer; on a GPU the Python and launch overhead of that (tens of
microseconds each) costs more than the kernels themselves. Replaying a captured graph costs one launch.

Shapes are made static by padding: the batch to the next power of two (padding rows write their K/V into a
scratch slot past `max_batch_size` and see one key), the key length to the next power of two (at least 128,
at most max_seq_len; the extra keys are masked). Slots are read either as a slice `0..B-1` (the executor's
usual, lowest-slots-first layout) or gathered by index. Only single-rank dense (non-MoE) models are
captured: routing needs host syncs, and collectives stay eager (see `graphs_enabled`).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from generator.engine.kv_cache import KVCache
from generator.engine.model import DecoderModel, ForwardBatch, ForwardPlan, make_batch

_MIN_KEY_LENGTH = 128
# fields of the one int64 staging tensor copied to the GPU per step
_FIELDS = ("token_ids", "positions", "total_lengths", "write_slots", "write_positions", "slot_index")


def graphs_enabled(model: DecoderModel) -> bool:
    """Graphs run on CUDA, single rank, dense MLP; GEN_REPO_CUDA_GRAPHS=0 turns them off.

    Multi-rank engines stay eager: capturing the TP all-reduces hung in a first try on 2 H200s (not debugged).
    """
    return (model.device.type == "cuda" and model.mapping.world_size == 1 and model.config.moe is None
            and os.environ.get("GEN_REPO_CUDA_GRAPHS", "1") != "0")


def _next_power_of_two(value: int) -> int:
    return 1 << max(0, value - 1).bit_length()


class _Captured:
    """One graph with its static inputs and output."""

    def __init__(self, model: DecoderModel, cache: KVCache, batch: int, key_length: int, contiguous: bool,
                 scratch_slot: int, pool: Any) -> None:
        device = model.device
        self.batch = batch
        self.contiguous = contiguous
        self.staging = torch.zeros((len(_FIELDS), batch), dtype=torch.long, device=device)
        fields = dict(zip(_FIELDS, self.staging, strict=True))
        rows = torch.arange(batch, device=device)
        self.inputs = ForwardBatch(
            token_ids=fields["token_ids"].view(batch, 1), positions=fields["positions"].view(batch, 1),
            past_lengths=fields["positions"], total_lengths=fields["total_lengths"],
            last_index=torch.zeros(batch, dtype=torch.long, device=device),
            slot_index=slice(0, batch) if contiguous else fields["slot_index"],
            write_slots=fields["write_slots"], write_positions=fields["write_positions"],
            write_rows=rows, write_cols=torch.zeros(batch, dtype=torch.long, device=device),
            max_total=key_length, nothing_cached=False)
        # harmless inputs for warm-up and capture: every row writes into the scratch slot, sees one key
        self.staging.zero_()
        fields["total_lengths"].fill_(1)
        fields["write_slots"].fill_(scratch_slot)
        fields["slot_index"].fill_(scratch_slot)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up outside the graph (lazy inits, autotuning)
                model.forward(self.inputs, cache)
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            logits = model.forward(self.inputs, cache)
        self.logits = logits  # None on ranks other than 0

    def run(self, staging_host: torch.Tensor, rows: int) -> torch.Tensor | None:
        self.staging.copy_(staging_host, non_blocking=True)
        self.graph.replay()
        return self.logits[:rows] if self.logits is not None else None


def new_runner(model: DecoderModel) -> tuple[KVCache, DecodeGraphs | None]:
    """The rank's KV cache, plus graphs when they apply (then the cache gets one scratch slot)."""
    if not graphs_enabled(model):
        return model.new_cache(), None
    cache = model.new_cache(extra_slots=1)
    return cache, DecodeGraphs(model, cache, scratch_slot=model.config.max_batch_size)


def run_forward(model: DecoderModel, cache: KVCache, graphs: DecodeGraphs | None,
                plan: ForwardPlan) -> torch.Tensor | None:
    """One forward of `plan` on this rank: a graph replay for generation steps when possible, else eager."""
    if graphs is not None and graphs.handles(plan):
        return graphs.forward(plan)
    return model.forward(make_batch(plan, model.device), cache)


class DecodeGraphs:
    """Captures lazily and replays the generation-phase forward of `model` over `cache`."""

    def __init__(self, model: DecoderModel, cache: KVCache, scratch_slot: int) -> None:
        self.model = model
        self.cache = cache
        self.scratch_slot = scratch_slot
        self.max_batch = model.config.max_batch_size
        self.max_seq_len = model.config.max_seq_len
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, int, bool], _Captured] = {}

    def handles(self, plan: ForwardPlan) -> bool:
        """A generation step: one new token per row, something cached for each."""
        return all(len(t) == 1 for t in plan.tokens) and min(plan.past_lengths) > 0

    def forward(self, plan: ForwardPlan) -> torch.Tensor | None:
        rows = len(plan.slots)
        batch = min(_next_power_of_two(rows), self.max_batch)
        totals = [p + 1 for p in plan.past_lengths]
        key_length = min(max(_MIN_KEY_LENGTH, _next_power_of_two(max(totals))), self.max_seq_len)
        contiguous = plan.slots == list(range(rows))
        key = (batch, key_length, contiguous)
        captured = self.graphs.get(key)
        if captured is None:
            captured = _Captured(self.model, self.cache, batch, key_length, contiguous, self.scratch_slot, self.pool)
            self.graphs[key] = captured
        padding = batch - rows
        scratch = self.scratch_slot
        staging = torch.tensor([
            [t[0] for t in plan.tokens] + [0] * padding,
            list(plan.past_lengths) + [0] * padding,
            totals + [1] * padding,
            list(plan.slots) + [scratch] * padding,
            list(plan.past_lengths) + [0] * padding,
            list(plan.slots) + [scratch] * padding,
        ], dtype=torch.long).pin_memory()
        return captured.run(staging, rows)
