"""`EngineProcess`: the executor in a child process gives the same tokens as in process, and every request ends
with a final result whatever happens to the child."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from generator.engine import EngineProcess, GenerationRequest, GenerationResult, SamplingConfig, run_prompts
from generator.errors import ConfigError
from tests.engine.test_engine import NEW_TOKENS, PROMPTS, engine_for
from tests.factories import make_mpt


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("engine-process")
    return engine_for(make_mpt(root / "hf"), root)


class Collector:
    """The results of one request, and an event set by its final one."""

    def __init__(self) -> None:
        self.results: list[GenerationResult] = []
        self.done = threading.Event()

    def __call__(self, result: GenerationResult) -> None:
        self.results.append(result)
        if result.finished:
            self.done.set()

    def tokens(self) -> list[int]:
        return [token for result in self.results for token in result.token_ids]


def test_same_tokens_as_in_process(engine: Path) -> None:
    sampling = SamplingConfig(max_new_tokens=NEW_TOKENS)
    expected = [result.token_ids for result in run_prompts(engine, PROMPTS, sampling)]
    with EngineProcess(engine) as process:
        collectors = [Collector() for _ in PROMPTS]
        for prompt, collector, streaming in zip(PROMPTS, collectors, [True, False, True, False], strict=True):
            process.enqueue(GenerationRequest(prompt, sampling, streaming), collector)
        for collector in collectors:
            assert collector.done.wait(60)
        assert [collector.tokens() for collector in collectors] == expected
        assert len(collectors[0].results) == NEW_TOKENS  # streaming: one result per token, the last one final
        assert [r.finished for r in collectors[0].results] == [False] * (NEW_TOKENS - 1) + [True]
        assert collectors[1].results[0].finish_reason == "length"
        deadline = time.monotonic() + 10
        while process.load != (0, 0, 0.0) and time.monotonic() < deadline:  # an idle engine reports zeros
            time.sleep(0.1)
        assert process.load == (0, 0, 0.0)


def test_bad_request_raises_at_once_and_cancel_ends_it(engine: Path) -> None:
    with EngineProcess(engine) as process:
        with pytest.raises(ValueError, match="outside the vocabulary"):
            process.enqueue(GenerationRequest([10**6], SamplingConfig(max_new_tokens=4)), Collector())
        long = Collector()
        request_id = process.enqueue(GenerationRequest([1, 2, 3], SamplingConfig(max_new_tokens=60), True), long)
        while not long.results:
            time.sleep(0.01)
        process.cancel(request_id)
        assert long.done.wait(30)
        assert long.results[-1].finish_reason == "cancelled"
        assert len(long.tokens()) < 60


def test_shutdown_ends_requests_in_flight(engine: Path) -> None:
    process = EngineProcess(engine)
    waiting = [Collector() for _ in range(3)]
    for collector in waiting:
        process.enqueue(GenerationRequest([5, 6, 7], SamplingConfig(max_new_tokens=60), True), collector)
    process.shutdown()
    for collector in waiting:
        assert collector.done.is_set()
        assert collector.results[-1].finish_reason in ("cancelled", "length")
    with pytest.raises(RuntimeError):
        process.enqueue(GenerationRequest([1], SamplingConfig(max_new_tokens=2)), Collector())


def test_a_dead_engine_process_ends_every_request_with_an_error(engine: Path) -> None:
    process = EngineProcess(engine)
    try:
        running = Collector()
        process.enqueue(GenerationRequest([1, 2], SamplingConfig(max_new_tokens=60), True), running)
        while not running.results:
            time.sleep(0.01)
        process._process.kill()
        assert running.done.wait(30)
        assert running.results[-1].finish_reason == "error"
        assert "exited with code" in (running.results[-1].error or "")
        with pytest.raises(RuntimeError, match="exited with code"):
            process.enqueue(GenerationRequest([1], SamplingConfig(max_new_tokens=2)), Collector())
    finally:
        process.shutdown(timeout=10)


def test_an_engine_that_cannot_start_is_one_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="could not start|before it was ready"):
        EngineProcess(tmp_path / "no-such-engine")
