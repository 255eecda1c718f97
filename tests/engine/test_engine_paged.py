"""The paged KV cache: block accounting and prefix reuse, the scheduler's chunking and preemption, and greedy
parity with transformers through chunked prefill, preemption + recompute and reused prefix blocks."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from generator.build import BuildSettings, build_engine
from generator.convert.job import ConvertSettings, convert_checkpoint
from generator.engine import Executor, GenerationRequest, GenerationResult, SamplingConfig
from generator.engine.block_manager import BlockManager
from generator.engine.scheduler import Scheduler, Sequence
from tests.factories import hf_greedy, make_dbrx, make_mpt
from tests.interpreted import run_interpreted

PROMPTS = [[1, 2, 3, 4, 5], [7, 100, 200], [42] * 11, [300, 5, 17, 17, 250, 9, 10]]
NEW_TOKENS = 10
SHARED = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]  # a prefix of 2.5 blocks of 4 tokens
REUSE_PROMPTS = [SHARED + [30, 31], SHARED + [40], SHARED + [30, 31], SHARED[:8] + [50, 51, 52]]


# block manager ------------------------------------------------------------------------------------------------
def test_blocks_are_handed_out_and_taken_back() -> None:
    blocks = BlockManager(num_blocks=5, block_size=4)
    assert blocks.num_free == 4 and blocks.capacity == 4
    table: list[int] = []
    assert blocks.grow(table, 5) and len(table) == 2 and 0 not in table
    assert blocks.grow(table, 8) and len(table) == 2  # still fits
    other: list[int] = []
    assert not blocks.grow(other, 12) and other == []  # 3 blocks wanted, 2 free: nothing taken
    assert blocks.grow(other, 8) and blocks.num_free == 0
    assert set(table).isdisjoint(other)
    blocks.release(table)
    assert table == [] and blocks.num_free == 2
    blocks.release(other)
    assert blocks.num_free == 4


def test_full_prefix_blocks_are_reused_and_survive_until_handed_out_again() -> None:
    blocks = BlockManager(num_blocks=6, block_size=4, enable_reuse=True)
    first = Sequence(list(range(10)), [])
    assert blocks.take_prefix(first.tokens()) == []
    assert blocks.grow(first.block_table, 10)
    blocks.register_full_blocks(first.block_table, first.tokens, 10, first.block_hashes)
    assert len(first.block_hashes) == 2  # the third block is not full
    # same first 8 tokens: the two full blocks are shared, the last token is never taken from the cache
    second = list(range(8)) + [99]
    assert blocks.take_prefix(second) == first.block_table[:2]
    assert blocks.ref_count(first.block_table[0]) == 2 and blocks.num_reused == 2
    # exactly 8 tokens: only the first block (the second holds the last token, which must be computed)
    assert blocks.take_prefix(list(range(8))) == first.block_table[:1]
    # a different first block: no reuse of the second either (the hash chains the whole prefix)
    assert blocks.take_prefix([7] + list(range(1, 10))) == []
    cached = list(first.block_table)
    blocks.release(first.block_table)
    # still cached after release: a later prompt revives them from the free list
    assert blocks.can_admit(list(range(10)))
    revived = blocks.take_prefix(list(range(10)))
    assert revived == cached[:2]
    blocks.release(revived)


def test_released_cache_blocks_are_evicted_when_memory_is_needed() -> None:
    blocks = BlockManager(num_blocks=3, block_size=2, enable_reuse=True)
    sequence = Sequence([1, 2, 3, 4, 5], [])
    assert blocks.grow(sequence.block_table, 4)
    blocks.register_full_blocks(sequence.block_table, sequence.tokens, 4, sequence.block_hashes)
    blocks.release(sequence.block_table)
    other: list[int] = []
    assert blocks.grow(other, 4)  # takes both cached blocks, which forget their contents
    assert blocks.take_prefix([1, 2, 3, 4, 5]) == []


# scheduler --------------------------------------------------------------------------------------------------
def test_scheduler_chunks_prompts_under_the_token_budget_with_decodes_first() -> None:
    scheduler = Scheduler(BlockManager(64, 4), max_batch_size=4, max_num_tokens=6)
    running = Sequence([1, 2], [])
    scheduler.add(running)
    work = scheduler.schedule()
    assert [(w.start, w.count) for w in work] == [(0, 2)] and work[0].samples
    scheduler.computed(work)
    assert running.num_computed == 2
    running.output.append(9)  # sampled: now a decode
    long = Sequence(list(range(10)), [])
    scheduler.add(long)
    work = scheduler.schedule()
    assert [(w.sequence, w.start, w.count) for w in work] == [(running, 2, 1), (long, 0, 5)]
    assert work[0].samples and not work[1].samples
    scheduler.computed(work)
    running.output.append(8)
    work = scheduler.schedule()
    assert [(w.sequence, w.start, w.count) for w in work] == [(running, 3, 1), (long, 5, 5)]
    assert work[1].samples


def test_scheduler_preempts_the_newest_sequence_when_blocks_run_out() -> None:
    blocks = BlockManager(num_blocks=5, block_size=2)  # 4 blocks = 8 tokens
    scheduler = Scheduler(blocks, max_batch_size=4, max_num_tokens=16)
    scheduler.reserve = 0
    old, new = Sequence([1, 2, 3], []), Sequence([4, 5, 6], [])
    scheduler.add(old)
    scheduler.add(new)
    for _ in range(2):  # the prompts, then one decode each: 4 tokens = 2 blocks each, the pool is full
        work = scheduler.schedule()
        assert [w.sequence for w in work] == [old, new] and all(w.samples for w in work)
        scheduler.computed(work)
        old.output.append(7)
        new.output.append(8)
    assert blocks.num_free == 0
    work = scheduler.schedule()  # old needs a third block: new, the newest, gives its blocks back
    assert [(w.sequence, w.start, w.count) for w in work] == [(old, 4, 1)] and scheduler.num_preemptions == 1
    assert new.num_computed == 0 and new.block_table == [] and scheduler.waiting[0] is new
    scheduler.computed(work)
    scheduler.remove(old)  # finished: new is recomputed from all its tokens, then samples
    work = scheduler.schedule()
    assert [(w.sequence, w.start, w.count) for w in work] == [(new, 0, 5)] and work[0].samples


def test_scheduler_admission_waits_for_free_blocks() -> None:
    blocks = BlockManager(num_blocks=5, block_size=2)
    scheduler = Scheduler(blocks, max_batch_size=4, max_num_tokens=16)
    first, second = Sequence([1] * 7, []), Sequence([2] * 3, [])
    scheduler.add(first)
    scheduler.add(second)
    assert [w.sequence for w in scheduler.schedule()] == [first]  # 4 blocks taken, second waits
    assert list(scheduler.waiting) == [second]
    scheduler.remove(first)
    assert [w.sequence for w in scheduler.schedule()] == [second]


# executor parity ---------------------------------------------------------------------------------------------
def engine_with_blocks(hf_dir: Path, root: Path, tokens_per_block: int, max_batch_size: int = 4) -> Path:
    checkpoint = convert_checkpoint(ConvertSettings(hf_dir, root / "checkpoint", dtype="float32", progress=False))
    engine = build_engine(BuildSettings(checkpoint, root / "engine", max_batch_size=max_batch_size,
                                        max_input_len=32, max_seq_len=64))
    config_path = engine / "config.json"
    config = json.loads(config_path.read_text())
    config["build_config"]["tokens_per_block"] = tokens_per_block
    config_path.write_text(json.dumps(config))
    return engine


@pytest.fixture(scope="module")
def mpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[list[int]]]:
    root = tmp_path_factory.mktemp("paged-mpt")
    hf_dir = make_mpt(root / "hf")
    return hf_dir, engine_with_blocks(hf_dir, root, tokens_per_block=4), hf_greedy(hf_dir, PROMPTS, NEW_TOKENS)


def run_all(executor: Executor, prompts: list[list[int]], new_tokens: int = NEW_TOKENS, stagger: float = 0.0
            ) -> list[list[int]]:
    """Enqueue every prompt (streaming for every other one) and join each request's tokens."""
    runs: list[tuple[threading.Event, list[GenerationResult]]] = []
    for index, prompt in enumerate(prompts):
        done, results = threading.Event(), []

        def on_result(result: GenerationResult, done: threading.Event = done,
                      results: list[GenerationResult] = results) -> None:
            results.append(result)
            if result.finished:
                done.set()

        executor.enqueue(GenerationRequest(prompt, SamplingConfig(max_new_tokens=new_tokens), index % 2 == 0),
                         on_result)
        runs.append((done, results))
        time.sleep(stagger)
    outputs = []
    for done, results in runs:
        assert done.wait(120)
        assert [r.finished for r in results].count(True) == 1 and results[-1].finish_reason == "length"
        outputs.append([t for r in results for t in r.token_ids])
    return outputs


def test_chunked_prefill_mixed_with_decodes_matches_transformers(mpt: tuple[Path, Path, list[list[int]]]) -> None:
    _, engine, expected = mpt
    # a budget of 4 tokens per step: the 11-token prompt takes 3 chunks while the others decode
    with Executor(engine, max_num_tokens=4) as executor:
        assert executor.max_num_tokens == 4
        assert run_all(executor, PROMPTS, stagger=0.01) == expected


def test_preemption_recomputes_and_streams_continue(mpt: tuple[Path, Path, list[list[int]]]) -> None:
    _, engine, expected = mpt
    # 8 blocks of 4 tokens: the 4 requests need up to 6 blocks each at the end, so some are preempted
    with Executor(engine, max_tokens_in_paged_kv_cache=32) as executor:
        assert executor.kv_cache_info["tokens"] == 32
        assert run_all(executor, PROMPTS * 2) == expected * 2
        assert executor.kv_cache_info["preemptions"] > 0


def test_request_larger_than_the_pool_is_refused(mpt: tuple[Path, Path, list[list[int]]]) -> None:
    with Executor(mpt[1], max_tokens_in_paged_kv_cache=16) as executor, pytest.raises(ValueError, match="KV cache"):
        executor.enqueue(GenerationRequest([1] * 10, SamplingConfig(max_new_tokens=10)), lambda _: None)


@pytest.mark.parametrize("model", ["mpt", "dbrx"])
def test_prefix_reuse_matches_transformers(tmp_path: Path, model: str) -> None:
    hf_dir = make_mpt(tmp_path / "hf") if model == "mpt" else make_dbrx(tmp_path / "hf", kv_n_heads=2)
    engine = engine_with_blocks(hf_dir, tmp_path, tokens_per_block=4)
    expected = hf_greedy(hf_dir, REUSE_PROMPTS, NEW_TOKENS)
    with Executor(engine, enable_kv_cache_reuse=True) as executor:
        got = [run_all(executor, [prompt])[0] for prompt in REUSE_PROMPTS]  # one at a time: blocks are cached
        assert got == expected
        assert executor.kv_cache_info["reused_blocks"] >= 2 + 2 + 2
        assert run_all(executor, REUSE_PROMPTS) == expected  # and all at once


# the Triton kernel (interpreted on CPU) against the gather reference -----------------------------------------
_KERNEL_CHECK = """
import torch
from generator.engine.attention import decode_attention_reference, paged_decode_attention
torch.manual_seed(0)
for heads, kv_heads, alibi, int8 in [(4, 4, True, False), (8, 2, False, False), (4, 1, True, True)]:
    hd, block, blocks = 16, 4, 12
    dtype = torch.int8 if int8 else torch.float32
    k = torch.randn(blocks, block, kv_heads, hd)
    v = torch.randn(blocks, block, kv_heads, hd)
    if int8:
        k, v = (k * 40).round().clamp(-128, 127).to(dtype), (v * 40).round().clamp(-128, 127).to(dtype)
    lengths = torch.tensor([1, 7, 13, 4], dtype=torch.int32)
    tables = torch.tensor([[3, 0, 0, 0], [5, 1, 0, 0], [2, 9, 4, 11], [7, 0, 0, 0]], dtype=torch.int32)
    q = torch.randn(4, heads, hd)
    slopes = torch.rand(heads) if alibi else None
    scale = 1.0 / hd ** 0.5
    kv_scale = 0.025 if int8 else None
    want = decode_attention_reference(q, k, v, tables, lengths, scale, slopes, kv_scale)
    got = paged_decode_attention(q, k, v, tables, lengths, scale, slopes, kv_scale)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (heads, kv_heads, (got - want).abs().max())
    # split keys (flash-decoding): 3 splits of 8 keys over 16-token tables, the last always empty
    split = paged_decode_attention(q, k, v, tables, lengths, scale, slopes, kv_scale, {"TILE": 4, "num_warps": 1},
                                   splits=3)
    assert torch.allclose(split, want, atol=1e-4, rtol=1e-4), (heads, kv_heads, (split - want).abs().max())
from generator.engine.attention import store_kv
qkv = torch.randn(5, (4 + 2 * 2) * 16)
k, v = qkv[:, 64:96].view(5, 2, 16), qkv[:, 96:].view(5, 2, 16)  # strided views, as the model passes them
pool_k, pool_v = torch.zeros(12, 2, 16), torch.zeros(12, 2, 16)
slots = torch.tensor([3, 0, 11, 7, 5])
store_kv(k, v, slots, pool_k, pool_v)
assert torch.equal(pool_k[slots], k) and torch.equal(pool_v[slots], v)
assert pool_k.abs().sum() == k.abs().sum()
import math
from generator.engine.attention import paged_prefill_attention
def reference(q, kb, vb, tables, starts, counts, past, slopes, kv_scale):
    out = torch.empty_like(q)
    bs = kb.shape[1]; heads = q.shape[1]; kvh = kb.shape[2]
    for i in range(tables.shape[0]):
        n, p = int(counts[i]), int(past[i]); total = n + p
        pos = torch.arange(total)
        slots = tables[i].long()[pos // bs] * bs + pos % bs
        k = kb.flatten(0, 1)[slots].float(); v = vb.flatten(0, 1)[slots].float()
        if kv_scale is not None: k, v = k * kv_scale, v * kv_scale
        k = k.repeat_interleave(heads // kvh, 1); v = v.repeat_interleave(heads // kvh, 1)
        qq = q[int(starts[i]):int(starts[i]) + n].float()
        s = torch.einsum("qhd,khd->hqk", qq, k) / math.sqrt(q.shape[-1])
        if slopes is not None: s = s + slopes[:, None, None] * (pos - (total - 1)).float()[None, None, :]
        mask = pos[None, :] <= (p + torch.arange(n))[:, None]
        s = s.masked_fill(~mask[None], float("-inf"))
        out[int(starts[i]):int(starts[i]) + n] = torch.einsum("hqk,khd->qhd", s.softmax(-1), v).to(q.dtype)
    return out
for heads, kvh, alibi, int8 in [(4, 4, True, False), (8, 2, False, False), (4, 1, True, True)]:
    hd, bs, nb = 16, 4, 40
    kb = torch.randn(nb, bs, kvh, hd); vb = torch.randn(nb, bs, kvh, hd)
    kv_scale = None
    if int8:
        kv_scale = 0.025
        kb, vb = (kb * 40).round().clamp(-128, 127).to(torch.int8), (vb * 40).round().clamp(-128, 127).to(torch.int8)
    counts = torch.tensor([5, 1, 37], dtype=torch.int32); past = torch.tensor([0, 9, 3], dtype=torch.int32)
    starts = torch.tensor([0, 5, 6], dtype=torch.int32)
    perm = torch.randperm(nb - 1) + 1
    tables = perm[:30].view(3, 10).to(torch.int32)
    q = torch.randn(43, heads, hd)
    slopes = torch.rand(heads) if alibi else None
    want = reference(q, kb, vb, tables, starts, counts, past, slopes, kv_scale)
    got = paged_prefill_attention(q, kb, vb, tables, starts, counts, past, 37, slopes, kv_scale)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (heads, kvh, (got - want).abs().max())
from generator.engine.attention import add_layer_norm
x, residual = torch.randn(6, 40), torch.randn(6, 40)
weight, bias = torch.randn(40), torch.randn(40)
for b in (bias, None):
    total, normed = add_layer_norm(x, residual, weight, b, 1e-5)
    assert torch.equal(total, x + residual)
    want = torch.nn.functional.layer_norm(x + residual, (40,), weight, b, 1e-5)
    assert torch.allclose(normed, want, atol=1e-5), (normed - want).abs().max()
print("ok")
"""


def test_paged_decode_kernel_matches_the_gather_reference() -> None:
    pytest.importorskip("triton")
    completed = run_interpreted("-c", _KERNEL_CHECK)
    assert completed.returncode == 0 and "ok" in completed.stdout, completed.stdout + completed.stderr


_ENGINE_CHECK = """
import json, sys, threading
from generator.engine import Executor, GenerationRequest, SamplingConfig
from generator.engine.attention import kernel_available, prefill_kernel_available
import torch
assert kernel_available(torch.device("cpu")) and prefill_kernel_available(torch.device("cpu"))
prompts, new_tokens = json.loads(sys.argv[2]), int(sys.argv[3])
outputs = []
for budget in (None, 4):  # whole prompts; then chunks of 4 tokens mixed with decodes
    with Executor(sys.argv[1], max_num_tokens=budget) as executor:
        results, events = [None] * len(prompts), [threading.Event() for _ in prompts]
        for index, prompt in enumerate(prompts):
            def done(result, index=index):
                results[index] = result
                events[index].set()
            executor.enqueue(GenerationRequest(prompt, SamplingConfig(max_new_tokens=new_tokens)), done)
        for event in events:
            event.wait()
        outputs.append([r.token_ids for r in results])
print(json.dumps(outputs))
"""


def test_engine_through_the_kernel_matches_transformers(mpt: tuple[Path, Path, list[list[int]]]) -> None:
    """The whole engine on the (interpreted) decode and prefill kernels, blocks of 4 tokens, whole prompts and
    chunked ones."""
    pytest.importorskip("triton")
    completed = run_interpreted("-c", _ENGINE_CHECK, str(mpt[1]), json.dumps(PROMPTS), str(NEW_TOKENS))
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout.splitlines()[-1]) == [mpt[2], mpt[2]]


def test_plan_round_trips_through_its_array() -> None:
    from generator.engine.model import ForwardPlan

    plan = ForwardPlan([[5], [1, 2, 3], [9, 8]], [7, 0, 4], [[3, 4], [1], [2, 6, 8]])
    back = ForwardPlan.from_array(plan.to_array())
    assert back == plan and back.num_decode == 1


def test_decode_graph_inputs_match_the_eager_batch() -> None:
    """The host staging of a decode-graph replay (run here without a GPU) against make_batch's tensors."""
    import torch

    from generator.engine.cuda_graphs import DecodeGraphs, capture_sizes
    from generator.engine.model import ForwardPlan, make_batch

    assert capture_sizes(4) == [1, 2, 4] and capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    graphs = DecodeGraphs.__new__(DecodeGraphs)  # only the host side: no CUDA here
    graphs.block_size = 4
    graphs.host_tokens, graphs.host_positions, graphs.host_slots = (torch.full((8,), 99) for _ in range(3))
    graphs.host_lengths = torch.full((8,), 99, dtype=torch.int32)
    graphs.host_tables = torch.full((8, 5), 7, dtype=torch.int32)  # stale ids from an earlier step
    plan = ForwardPlan([[5], [6], [7]], [0, 9, 4], [[3], [1, 2, 6], [4, 8]])
    graphs._stage(plan, 4)
    eager = make_batch(plan, torch.device("cpu"), 4)
    assert graphs.host_tokens[:3].tolist() == eager.token_ids.tolist()
    assert graphs.host_positions[:3].tolist() == eager.positions.tolist()
    assert graphs.host_slots[:3].tolist() == eager.slot_mapping.tolist()
    assert eager.decode_lengths is not None and eager.decode_tables is not None
    assert graphs.host_lengths[:3].tolist() == eager.decode_lengths.tolist()
    assert graphs.host_tables[:3, :3].tolist() == [[3, 7, 7], [1, 2, 6], [4, 8, 7]]
    # the padding row writes and reads slot 0 of the padding block
    assert (graphs.host_tokens[3], graphs.host_slots[3], graphs.host_lengths[3], graphs.host_tables[3, 0]) == (
        0, 0, 1, 0)


@pytest.mark.parametrize("lookahead", ["1", "0"])
def test_everything_at_once_matches_the_plain_run(mpt: tuple[Path, Path, list[list[int]]], lookahead: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Shared prefixes, a small pool (preemption), a small budget (chunking), reuse, cancellations, requests
    joining running ones, with and without the executor's lookahead: every request that is not cancelled gets
    the tokens of a plain run."""
    monkeypatch.setenv("GEN_REPO_LOOKAHEAD", lookahead)
    import random

    rng = random.Random(7)
    prefix = [rng.randrange(512) for _ in range(9)]
    # every other prompt starts with the whole prefix (2 full blocks of 4), the others with a random share of it
    prompts = [prefix[:9 if i % 2 else rng.randrange(0, 10)]
               + [rng.randrange(512) for _ in range(rng.randrange(1, 8))] for i in range(12)]
    lengths = [11 if i in (3, 8) else rng.randrange(1, 12) for i in range(len(prompts))]  # 3, 8: cancelled

    def run(executor: Executor, cancel: set[int]) -> list[list[int] | None]:
        events = [threading.Event() for _ in prompts]
        outputs: list[list[int]] = [[] for _ in prompts]
        reasons: list[str | None] = [None] * len(prompts)
        for index, (prompt, length) in enumerate(zip(prompts, lengths, strict=True)):
            def on_result(result: GenerationResult, index: int = index) -> None:
                outputs[index] += result.token_ids
                if result.finished:
                    reasons[index] = result.finish_reason
                    events[index].set()
            request_id = executor.enqueue(GenerationRequest(prompt, SamplingConfig(max_new_tokens=length),
                                                            streaming=index % 3 != 0), on_result)
            if index in cancel:
                executor.cancel(request_id)
        for event in events:
            assert event.wait(120)
        return [None if reason == "cancelled" else out for out, reason in zip(outputs, reasons, strict=True)]

    with Executor(mpt[1]) as executor:
        plain = run(executor, set())
    # 7 blocks: the longest request (16 + 11 tokens) fits alone, a few together do not
    with Executor(mpt[1], max_tokens_in_paged_kv_cache=28, max_num_tokens=5, enable_kv_cache_reuse=True) as executor:
        busy = run(executor, {3, 8})
        info = executor.kv_cache_info
    assert busy[3] is None and busy[8] is None
    assert [b for i, b in enumerate(busy) if i not in (3, 8)] == [p for i, p in enumerate(plain) if i not in (3, 8)]
    assert info["preemptions"] > 0 and info["reused_blocks"] > 0, (info["preemptions"], info["reused_blocks"])
