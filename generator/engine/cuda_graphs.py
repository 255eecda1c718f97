"""CUDA graphs for decode steps: one captured forward per batch size of a fixed ladder up to max_batch_size.

A decode step launches ~15 kernels per layer; on a GPU the Python and launch overhead of that (tens of
microseconds each) costs more than the kernels themselves. Replaying a captured graph costs one launch.

Shapes are made static by padding: the batch to the next captured size (1, 2, 4, 8, then every 8 up to
max_batch_size; padding rows write their K/V into the padding block 0 and read one key from it), the block
tables to the longest a sequence can have. All graphs share their input buffers (views of the largest) and one
logits buffer, and one memory pool, captured largest first so the smaller ones reuse its memory. The paged
decode kernel reads each row's length from memory, so one graph serves every sequence length. MoE models are
captured when their routing runs without host syncs, and tensor-parallel engines with their NCCL all-reduces
inside the graphs (see `graphs_enabled`).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from generator.engine.kv_cache import KVPool
from generator.engine.model import DecoderModel, ForwardBatch, ForwardPlan

# decode rows whose input token is still on the device: (plan rows, indices into the tokens, the tokens)
DeviceTokens = tuple[list[int], list[int], torch.Tensor]


def substitute(token_ids: torch.Tensor, device_tokens: DeviceTokens) -> None:
    """`token_ids[rows] = tokens[sources]` on the device (decode rows come first: row i is token i)."""
    rows, sources, tokens = device_tokens
    if rows:
        index = torch.tensor(rows, dtype=torch.long).to(token_ids.device, non_blocking=True)
        picked = torch.tensor(sources, dtype=torch.long).to(tokens.device, non_blocking=True)
        token_ids[index] = tokens[picked].to(token_ids.dtype)


def graphs_enabled(model: DecoderModel) -> bool:
    """Graphs run on CUDA (MoE too when it runs without host syncs); GEN_REPO_CUDA_GRAPHS=0 turns them off.
    Tensor-parallel engines (pp 1) capture their NCCL all-reduces inside the graphs (every rank captures the same
    sizes in the same order at warm-up, the condition NCCL needs): on 2 x H100, MPT-7B bf16 TP2 decodes at
    5.1 ms a step with them and 29.4 ms without. GEN_REPO_CUDA_GRAPHS_TP=0 keeps multi-rank engines eager."""
    # a model whose MoE runs without host syncs says so with a true `moe_graph_safe` attribute
    moe_ok = model.config.moe is None or bool(getattr(model, "moe_graph_safe", False))
    if model.device.type != "cuda" or not moe_ok or os.environ.get("GEN_REPO_CUDA_GRAPHS", "1") == "0":
        return False
    if model.mapping.world_size == 1:
        return True
    return model.mapping.pipeline_parallel_size == 1 and os.environ.get("GEN_REPO_CUDA_GRAPHS_TP", "1") != "0"


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
        # static inputs: token ids, positions, slots (int64), lengths (int32), block tables (int32); a batch
        # of `size` rows uses the first `size` of each (contiguous slices: one plain copy per step each)
        blocks = max_blocks_per_sequence
        self.tokens = torch.zeros(self.max_batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(self.max_batch, dtype=torch.long, device=device)
        self.slots = torch.zeros(self.max_batch, dtype=torch.long, device=device)
        self.lengths = torch.ones(self.max_batch, dtype=torch.int32, device=device)
        self.tables = torch.zeros((self.max_batch, blocks), dtype=torch.int32, device=device)
        self.rows = torch.arange(self.max_batch, device=device)
        self.logits = (torch.zeros((self.max_batch, model.config.vocab_size), dtype=torch.float32, device=device)
                       if model.mapping.rank == 0 else None)
        # pinned host twins, rewritten every step (the step's token fetch syncs before the next rewrite). Table
        # columns past a step's widest table keep older ids: valid blocks, never read (past each row's length)
        self.host_tokens = torch.zeros(self.max_batch, dtype=torch.long).pin_memory()
        self.host_positions = torch.zeros(self.max_batch, dtype=torch.long).pin_memory()
        self.host_slots = torch.zeros(self.max_batch, dtype=torch.long).pin_memory()
        self.host_lengths = torch.ones(self.max_batch, dtype=torch.int32).pin_memory()
        self.host_tables = torch.zeros((self.max_batch, blocks), dtype=torch.int32).pin_memory()

    def _inputs(self, size: int) -> ForwardBatch:
        return ForwardBatch(
            token_ids=self.tokens[:size], positions=self.positions[:size], slot_mapping=self.slots[:size],
            last_index=self.rows[:size], num_rows=size, num_decode=size,
            decode_tables=self.tables[:size], decode_lengths=self.lengths[:size])

    def _capture(self, size: int) -> torch.cuda.CUDAGraph:
        model, device = self.model, self.model.device
        inputs = self._inputs(size)
        # harmless inputs: every row writes slot 0 (the padding block) and reads that one key
        for buffer in (self.tokens, self.positions, self.slots, self.tables, self.host_tables):
            buffer.zero_()
        self.lengths.fill_(1)
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

    def forward(self, plan: ForwardPlan, device_tokens: DeviceTokens | None = None) -> torch.Tensor | None:
        rows = len(plan.tokens)
        size = next(s for s in self.sizes if s >= rows)
        graph = self.graphs.get(size) or self._capture(size)
        self._stage(plan, size)
        for device_buffer, host_buffer in ((self.tokens, self.host_tokens), (self.positions, self.host_positions),
                                           (self.slots, self.host_slots), (self.lengths, self.host_lengths),
                                           (self.tables, self.host_tables)):
            device_buffer[:size].copy_(host_buffer[:size], non_blocking=True)
        if device_tokens is not None:
            substitute(self.tokens, device_tokens)
        graph.replay()
        return self.logits[:rows] if self.logits is not None else None

    def _stage(self, plan: ForwardPlan, size: int) -> None:
        """Write the step's inputs for a batch of `size` into the host buffers (rows past the plan's: padding)."""
        rows = len(plan.tokens)
        if max(len(t) for t in plan.block_tables) > self.host_tables.shape[1]:
            raise ValueError("a block table is longer than max_seq_len allows")
        tables = self.host_tables.numpy()
        tables[rows:size, 0] = 0  # padding rows read the padding block
        for row, table in enumerate(plan.block_tables):
            tables[row, :len(table)] = table
        past = np.asarray(plan.past_lengths, dtype=np.int64)
        self.host_tokens.numpy()[:rows] = [max(0, t[0]) for t in plan.tokens]  # placeholders: substituted
        self.host_tokens.numpy()[rows:size] = 0
        self.host_positions.numpy()[:rows] = past
        self.host_positions.numpy()[rows:size] = 0
        self.host_slots.numpy()[:rows] = (tables[np.arange(rows), past // self.block_size] * self.block_size
                                          + past % self.block_size)
        self.host_slots.numpy()[rows:size] = 0
        lengths = self.host_lengths.numpy()
        lengths[:rows] = past + 1
        lengths[rows:size] = 1
