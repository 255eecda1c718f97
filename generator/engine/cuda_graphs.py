"""CUDA graphs for decode steps: one captured forward per batch size of a fixed ladder up to max_batch_size.

A decode step launches ~15 kernels per layer; on a GPU the Python and launch overhead of that (tens of
microseconds each) costs more than the kernels themselves. Replaying a captured graph costs one launch.

Shapes are made static by padding: the batch to the next captured size (1, 2, 4, 8, then every 8 up to
max_batch_size; padding rows write their K/V into the padding block 0 and read one key from it), the block
tables to the longest a sequence can have. All graphs share their input buffers (views of the largest) and one
logits buffer, and one memory pool, captured largest first so the smaller ones reuse its memory. The paged
decode kernel reads each row's length from memory, so one graph serves every sequence length. Dense
(non-MoE) models are captured: routing needs host syncs; tensor parallelism only on request (see
`graphs_enabled`).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from generator.engine.kv_cache import KVPool
from generator.engine.model import DecoderModel, ForwardBatch, ForwardPlan


def graphs_enabled(model: DecoderModel) -> bool:
    """Graphs run on CUDA with a dense MLP (MoE routing syncs with the host); GEN_REPO_CUDA_GRAPHS=0 turns
    them off. Tensor-parallel engines (pp 1) capture their NCCL all-reduces inside the graphs only with
    GEN_REPO_CUDA_GRAPHS_TP=1: an earlier try hung on 2 H200s and this path has not been measured since (every
    rank now captures the same sizes in the same order at warm-up, the condition NCCL needs)."""
    if (model.device.type != "cuda" or model.config.moe is not None
            or os.environ.get("GEN_REPO_CUDA_GRAPHS", "1") == "0"):
        return False
    if model.mapping.world_size == 1:
        return True
    return model.mapping.pipeline_parallel_size == 1 and os.environ.get("GEN_REPO_CUDA_GRAPHS_TP") == "1"


def capture_sizes(max_batch_size: int) -> list[int]:
    """The captured batch sizes: 1, 2, 4, 8, 16, 24, ... and max_batch_size itself."""
    sizes = [s for s in (1, 2, 4) if s < max_batch_size]
    sizes += list(range(8, max_batch_size, 8))
    return sizes + [max_batch_size]


class DecodeGraphs:
    """Captures (at `capture_all`, or lazily) and replays the decode forward of `model` over `cache`."""

    def __init__(self, model: DecoderModel, cache: KVPool, max_blocks_per_sequence: int) -> None:
        self.model = model
        self.cache = cache
        self.block_size = cache.block_size
        self.max_batch = model.config.max_batch_size
        self.sizes = capture_sizes(self.max_batch)
        device = model.device
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # static inputs: token ids, positions, slots (int64), lengths (int32), block tables (int32)
        self.longs = torch.zeros((3, self.max_batch), dtype=torch.long, device=device)
        self.lengths = torch.ones(self.max_batch, dtype=torch.int32, device=device)
        self.tables = torch.zeros((self.max_batch, max_blocks_per_sequence), dtype=torch.int32, device=device)
        self.rows = torch.arange(self.max_batch, device=device)
        self.logits = (torch.zeros((self.max_batch, model.config.vocab_size), dtype=torch.float32, device=device)
                       if model.mapping.rank == 0 else None)
        # pinned host staging, rewritten every step (the step's token fetch syncs before the next rewrite)
        self.host_longs = torch.zeros((3, self.max_batch), dtype=torch.long).pin_memory()
        self.host_lengths = torch.ones(self.max_batch, dtype=torch.int32).pin_memory()
        self.host_tables = torch.zeros((self.max_batch, max_blocks_per_sequence), dtype=torch.int32).pin_memory()

    def _inputs(self, size: int) -> ForwardBatch:
        return ForwardBatch(
            token_ids=self.longs[0, :size], positions=self.longs[1, :size], slot_mapping=self.longs[2, :size],
            last_index=self.rows[:size], num_rows=size, num_decode=size,
            decode_tables=self.tables[:size], decode_lengths=self.lengths[:size])

    def _capture(self, size: int) -> torch.cuda.CUDAGraph:
        model, device = self.model, self.model.device
        inputs = self._inputs(size)
        # harmless inputs: every row writes slot 0 (the padding block) and reads that one key
        self.longs.zero_()
        self.lengths.fill_(1)
        self.tables.zero_()
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            model.forward(inputs, self.cache)  # warm-up outside the graph (lazy inits, kernel compilation)
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = model.forward(inputs, self.cache)
            if self.logits is not None and logits is not None:
                self.logits[:size].copy_(logits)
        self.graphs[size] = graph
        return graph

    def capture_all(self) -> None:
        """Capture every size now (largest first: the smaller graphs reuse its memory)."""
        for size in sorted(self.sizes, reverse=True):
            if size not in self.graphs:
                self._capture(size)
        torch.cuda.synchronize(self.model.device)

    def handles(self, plan: ForwardPlan) -> bool:
        """A decode step: one new token per row."""
        return plan.num_decode == len(plan.tokens) <= self.max_batch

    def forward(self, plan: ForwardPlan) -> torch.Tensor | None:
        rows = len(plan.tokens)
        size = next(s for s in self.sizes if s >= rows)
        graph = self.graphs.get(size) or self._capture(size)
        width = max(len(t) for t in plan.block_tables)
        tables = np.zeros((size, width), dtype=np.int32)
        for row, table in enumerate(plan.block_tables):
            tables[row, :len(table)] = table
        past = np.asarray(plan.past_lengths, dtype=np.int64)
        ids = np.zeros((3, size), dtype=np.int64)
        ids[0, :rows] = [t[0] for t in plan.tokens]
        ids[1, :rows] = past
        ids[2, :rows] = tables[np.arange(rows), past // self.block_size] * self.block_size + past % self.block_size
        lengths = np.ones(size, dtype=np.int32)
        lengths[:rows] = past + 1
        self.host_longs[:, :size].numpy()[:] = ids
        self.host_lengths[:size].numpy()[:] = lengths
        self.host_tables[:size, :width].numpy()[:] = tables
        self.longs[:, :size].copy_(self.host_longs[:, :size], non_blocking=True)
        self.lengths[:size].copy_(self.host_lengths[:size], non_blocking=True)
        self.tables[:size, :width].copy_(self.host_tables[:size, :width], non_blocking=True)
        graph.replay()
        return self.logits[:rows] if self.logits is not None else None
