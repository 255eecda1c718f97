"""The model runner: one rank's KV pool, and the forward of a `ForwardPlan` over it (graph replay or eager).

Every rank has one. Its pool is sized once at start (see kv_cache.pool_blocks): on CUDA after a profiling
forward of a full `max_num_tokens` step has shown how much memory activations take; with several ranks every
rank takes the smallest count, so block ids mean the same on every rank.
"""

from __future__ import annotations

import logging

import torch

from generator.engine.attention import kernel_available, prefill_kernel_available
from generator.engine.cuda_graphs import DecodeGraphs, DeviceTokens, graphs_enabled, substitute
from generator.engine.kv_cache import KVCacheSettings, KVPool, pool_blocks
from generator.engine.model import DecoderModel, ForwardBatch, ForwardPlan, make_batch

log = logging.getLogger(__name__)

_ACTIVATION_MARGIN = 1.5          # the profiled step is not the worst case (chunks with long histories)
_ACTIVATION_EXTRA = 512 * 2**20   # cuBLAS workspaces, graph pool, allocator slack


class ModelRunner:
    """Owns the rank's `KVPool` and runs forwards over it."""

    def __init__(self, model: DecoderModel, settings: KVCacheSettings, max_num_tokens: int | None = None) -> None:
        self.model = model
        self.max_num_tokens = max(max_num_tokens or model.config.max_num_tokens, model.config.max_batch_size)
        self.settings = settings
        config = model.config
        self.block_size = settings.block_size
        self.max_blocks_per_sequence = -(-config.max_seq_len // self.block_size)
        self.split_decode = kernel_available(model.device)
        # an INT8 KV cache: fresh prompts attend over their unquantized K/V (as TensorRT-LLM's context FMHA
        # does), which the SDPA path gives and reading the pool in place would not
        self.prefill_in_place = prefill_kernel_available(model.device) and model.kv_scales is None
        reserve = self._profile_activations() if model.device.type == "cuda" else 0
        blocks = pool_blocks(settings, token_bytes=model.kv_token_bytes(),
                             needed_tokens=config.max_batch_size * self.max_blocks_per_sequence * self.block_size,
                             device=model.device, reserve_bytes=reserve)
        blocks = model.comm.min_over_ranks(blocks)
        self.cache: KVPool = model.new_cache(blocks, self.block_size)
        self.graphs = DecodeGraphs(model, self.cache, self.max_blocks_per_sequence) if graphs_enabled(model) else None
        self.stats = self._zero_step_stats()
        log.info("KV cache: %d blocks of %d tokens (%d tokens, %.2f GiB) on %s", blocks - 1, self.block_size,
                 self.cache.num_tokens, self.cache.nbytes / 2**30, model.device)

    @staticmethod
    def _zero_step_stats() -> dict[str, int]:
        """Step counters: graph replays (their rows) and eager forwards (their rows, tokens and decode rows:
        a mixed step, prompt chunks and decodes together, runs its decodes eagerly too, which is what makes it
        slower than a replay). Read while the step loop runs, they may include the step in flight."""
        return dict.fromkeys(("graph_steps", "graph_rows", "eager_steps", "mixed_steps", "eager_rows",
                              "eager_tokens", "decode_rows_in_eager"), 0)

    def _dummy_plan(self, tokens: int) -> ForwardPlan:
        """Fresh prompts of max_input_len filling `tokens`, all in the padding block (ids 0)."""
        length = min(self.model.config.max_input_len, tokens)
        rows = max(1, tokens // length)
        table = [0] * (-(-length // self.block_size))
        return ForwardPlan([[0] * length for _ in range(rows)], [0] * rows, [table] * rows)

    def _profile_activations(self) -> int:
        """Peak bytes a full `max_num_tokens` prefill step allocates beyond what is held now."""
        device = self.model.device
        scratch = self.model.new_cache(1, self.block_size)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        with torch.inference_mode():
            plan = self._dummy_plan(self.max_num_tokens)
            self.model.forward(self._batch(plan), scratch)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del scratch
        torch.cuda.empty_cache()
        return int(peak * _ACTIVATION_MARGIN) + _ACTIVATION_EXTRA

    def execute(self, plan: ForwardPlan, device_tokens: DeviceTokens | None = None) -> torch.Tensor | None:
        """One forward of `plan`: a graph replay for a decode step when graphs apply, else eager.
        Returns the logits of every row's last token on rank 0, None elsewhere.

        `device_tokens` (rows, sources, tokens): decode rows `rows` take `tokens[sources]`, tokens sampled by
        the previous step and still on the device (their places in `plan` hold a placeholder).
        """
        stats, rows = self.stats, len(plan.tokens)
        if self.graphs is not None and self.graphs.handles(plan):
            stats["graph_steps"] += 1
            stats["graph_rows"] += rows
            return self.graphs.forward(plan, device_tokens)
        batch = self._batch(plan)
        decodes = plan.num_decode
        stats["eager_steps"] += 1
        stats["mixed_steps"] += 0 < decodes < rows
        stats["eager_rows"] += rows
        stats["eager_tokens"] += batch.num_tokens
        stats["decode_rows_in_eager"] += decodes
        if device_tokens is not None:
            substitute(batch.token_ids, device_tokens)
        return self.model.forward(batch, self.cache)

    def _batch(self, plan: ForwardPlan) -> ForwardBatch:
        return make_batch(plan, self.model.device, self.block_size, self.split_decode, self.prefill_in_place)

    def warmup(self) -> None:
        """Compile and capture now, not on the first requests: the decode graphs of every size, and one eager
        mixed step (prefill rows + decode rows, padding block only)."""
        with torch.inference_mode():
            if self.graphs is not None:
                self.graphs.capture_all()
            length = min(self.model.config.max_input_len, 2 * self.block_size)
            table = [0] * (-(-(length + 1) // self.block_size))
            plan = ForwardPlan([[0], [0] * length, [0] * length], [1, 0, 1], [table] * 3)
            self.execute(plan)
            if self.model.device.type == "cuda":
                torch.cuda.synchronize(self.model.device)
        self.stats = self._zero_step_stats()  # count requests' steps only

    def release(self) -> None:
        """Drop the CUDA graphs before the communicator goes: graphs that captured NCCL collectives keep the
        communicator busy, and destroying the process group under them hung a 4-rank shutdown on H100s."""
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)
        self.graphs = None
