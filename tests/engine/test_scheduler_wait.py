"""The scheduler's admission delay (`prefill_wait_steps`): new prompts join running sequences together after
waiting W steps, an idle engine and preempted sequences never wait, W = 0 is the plain scheduler; through the
executor the tokens are those of W = 0, and the model runner counts its eager and graph steps."""

from __future__ import annotations

from pathlib import Path

import pytest

from generator.engine import Executor
from generator.engine.block_manager import BlockManager
from generator.engine.process import EngineProcess
from generator.engine.scheduler import Scheduler, Sequence
from generator.errors import ConfigError
from tests.engine.test_engine_paged import NEW_TOKENS, PROMPTS, engine_with_blocks, run_all
from tests.factories import hf_greedy, make_mpt


def step(scheduler: Scheduler) -> list[tuple[Sequence, int, int]]:
    """One step: schedule, record it computed, and sample a token for every sequence at its end."""
    work = scheduler.schedule()
    scheduler.computed(work)
    for item in work:
        if item.samples:
            item.sequence.output.append(9)
    return [(w.sequence, w.start, w.count) for w in work]


def test_new_prompts_wait_while_others_run_then_join_together() -> None:
    scheduler = Scheduler(BlockManager(64, 4), max_batch_size=4, max_num_tokens=32, prefill_wait_steps=2)
    running = Sequence([1, 2], [])
    scheduler.add(running)
    assert step(scheduler) == [(running, 0, 2)]  # nothing runs: no wait
    first = Sequence([3, 4, 5], [])
    scheduler.add(first)
    assert step(scheduler) == [(running, 2, 1)]  # first has waited 0 steps
    second = Sequence([6, 7], [])
    scheduler.add(second)
    assert step(scheduler) == [(running, 3, 1)]  # 1 step
    assert step(scheduler) == [(running, 4, 1), (first, 0, 3), (second, 0, 2)]  # 2 steps: both join at once
    assert not scheduler.waiting


def test_an_idle_engine_admits_at_once() -> None:
    scheduler = Scheduler(BlockManager(64, 4), max_batch_size=4, max_num_tokens=32, prefill_wait_steps=100)
    done, later = Sequence([1, 2], []), Sequence([3], [])
    scheduler.add(done)
    assert step(scheduler) == [(done, 0, 2)]
    scheduler.add(later)
    assert step(scheduler) == [(done, 2, 1)]
    scheduler.remove(done)  # finished: nothing runs, so later need not wait
    assert step(scheduler) == [(later, 0, 1)]


def test_a_preempted_sequence_is_recomputed_at_once() -> None:
    blocks = BlockManager(num_blocks=7, block_size=2)  # 6 blocks = 12 tokens
    scheduler = Scheduler(blocks, max_batch_size=4, max_num_tokens=16, prefill_wait_steps=100)
    scheduler.reserve = 0
    a, b, c = Sequence([1, 2, 3], []), Sequence([4, 5, 6], []), Sequence([7, 8, 9], [])
    for sequence in (a, b, c):
        scheduler.add(sequence)
    assert step(scheduler) == [(a, 0, 3), (b, 0, 3), (c, 0, 3)]  # idle: all at once, 2 blocks each
    assert step(scheduler) == [(a, 3, 1), (b, 3, 1), (c, 3, 1)]
    assert step(scheduler) == [(a, 4, 1), (b, 4, 1)]  # a third block each: c, the newest, is preempted
    assert scheduler.waiting[0] is c and c.preemptions == 1
    scheduler.remove(b)
    assert step(scheduler) == [(a, 5, 1), (c, 0, 5)]  # a runs, yet c does not wait the 100 steps


def test_zero_wait_admits_at_the_next_step() -> None:
    scheduler = Scheduler(BlockManager(64, 4), max_batch_size=4, max_num_tokens=32)
    assert scheduler.prefill_wait_steps == 0
    running, new = Sequence([1, 2], []), Sequence([3, 4, 5], [])
    scheduler.add(running)
    step(scheduler)
    scheduler.add(new)
    assert step(scheduler) == [(running, 2, 1), (new, 0, 3)]


@pytest.fixture(scope="module")
def mpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[list[int]]]:
    root = tmp_path_factory.mktemp("wait-mpt")
    hf_dir = make_mpt(root / "hf")
    return engine_with_blocks(hf_dir, root, tokens_per_block=4), hf_greedy(hf_dir, PROMPTS, NEW_TOKENS)


def test_waiting_prompts_get_the_same_greedy_tokens(mpt: tuple[Path, list[list[int]]]) -> None:
    engine, expected = mpt
    with Executor(engine, max_num_tokens=4, prefill_wait_steps=3) as executor:
        before = executor.step_stats
        assert run_all(executor, PROMPTS * 2, stagger=0.01) == expected * 2
        stats = executor.step_stats
    assert before == dict.fromkeys(stats, 0)  # warm-up steps are not counted
    # CPU: no graphs; every row is a decode row or a prompt chunk
    assert stats["graph_steps"] == stats["graph_rows"] == 0 and stats["eager_steps"] > stats["mixed_steps"] > 0
    assert stats["eager_rows"] >= stats["decode_rows_in_eager"] >= len(PROMPTS) * 2 * (NEW_TOKENS - 1)
    assert stats["eager_tokens"] >= sum(len(p) for p in PROMPTS) * 2 + len(PROMPTS) * 2 * (NEW_TOKENS - 1)


def test_the_wait_comes_from_the_environment(mpt: tuple[Path, list[list[int]]],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEN_REPO_PREFILL_WAIT_STEPS", "5")
    with Executor(mpt[0]) as executor:
        assert executor.prefill_wait_steps == 5
    with Executor(mpt[0], prefill_wait_steps=0) as executor:  # the argument wins
        assert executor.prefill_wait_steps == 0
    monkeypatch.setenv("GEN_REPO_PREFILL_WAIT_STEPS", "soon")
    with pytest.raises(ConfigError, match="GEN_REPO_PREFILL_WAIT_STEPS must be a whole number >= 0, got .soon."):
        Executor(mpt[0])


def test_the_engine_process_passes_the_wait_to_its_executor(mpt: tuple[Path, list[list[int]]]) -> None:
    """The served path's EngineProcess hands its keyword arguments through: a bad wait is the child's error."""
    with pytest.raises(ConfigError, match="prefill_wait_steps must be a whole number >= 0, got -1"):
        EngineProcess(mpt[0], prefill_wait_steps=-1)
