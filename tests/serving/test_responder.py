"""The response path of the `tensorrt_llm` model without Triton: the real engine on tiny-mpt feeding `Responder`.

A sender slower than the engine (it sleeps per response, as a loaded tritonserver does) must get every token
exactly once and in order, several per response once it falls behind, one request on one thread at a time,
and the finished result last.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest

from generator.engine import Executor, GenerationRequest, GenerationResult, SamplingConfig
from generator.pipeline import PipelineResult
from generator.serving.triton_models.responder import OutputBuilder, Responder, merge_results

PROMPTS = [[5, 6, 7], [11, 12, 13, 14], [20, 21], [30, 31, 32, 33, 34]]
NEW_TOKENS = 24


class _Item:
    def __init__(self, streaming: bool) -> None:
        self.streaming = streaming


@pytest.fixture(scope="module")
def executor(tiny_mpt_job: PipelineResult) -> Any:
    with Executor(tiny_mpt_job.engine_dir, device="cpu") as engine:
        yield engine


def _sampling() -> SamplingConfig:
    return SamplingConfig(max_new_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS)


@pytest.mark.parametrize("threads", [1, 3])
def test_a_slow_sender_gets_every_token_in_order_several_per_response(executor: Any, threads: int) -> None:
    expected = [executor.generate(prompt, _sampling(), timeout=120).token_ids for prompt in PROMPTS * 4]
    received: dict[int, list[Any]] = {}
    busy: set[int] = set()
    overlaps: list[int] = []
    guard = threading.Lock()
    done = threading.Semaphore(0)

    def respond(pending: Any, item: Any, result: Any) -> None:
        with guard:
            if pending in busy:
                overlaps.append(pending)
            busy.add(pending)
        time.sleep(0.02)  # a sender much slower than one engine step
        with guard:
            busy.discard(pending)
            received.setdefault(pending, []).append(result)
        if result.finished:
            done.release()

    responder = Responder(respond, threads=threads)
    try:
        for index, prompt in enumerate(PROMPTS * 4):
            item = _Item(streaming=True)
            executor.enqueue(GenerationRequest(list(prompt), _sampling(), streaming=True),
                             lambda result, p=index, i=item: responder.push(p, i, result))
        for _ in range(len(expected)):
            assert done.acquire(timeout=120)
    finally:
        responder.close()
    assert overlaps == []
    responses = 0
    for index, tokens in enumerate(expected):
        results = received[index]
        assert [t for r in results for t in r.token_ids] == tokens
        assert [r.finished for r in results] == [False] * (len(results) - 1) + [True]
        responses += len(results)
    assert responses < len(expected) * NEW_TOKENS / 2, f"{responses} responses: tokens were not merged"


def test_merge_keeps_tokens_log_probs_and_the_last_state() -> None:
    from generator.engine.executor import GenerationResult

    parts = [GenerationResult(1, [4], False, None, [-0.5], -0.5),
             GenerationResult(1, [5, 6], False, None, [-0.25, -0.125], -0.875),
             GenerationResult(1, [7], True, "length", [-1.0], -1.875)]
    merged = merge_results(parts)
    assert merged.token_ids == [4, 5, 6, 7]
    assert merged.log_probs == [-0.5, -0.25, -0.125, -1.0]
    assert (merged.finished, merged.finish_reason, merged.cum_log_prob) == (True, "length", -1.875)
    assert merge_results(parts[:1]) is parts[0]


def test_output_builder_builds_only_what_was_asked() -> None:
    builder = OutputBuilder(lambda name, array: (name, array))
    assert builder.wanted([]) == OutputBuilder.ALL
    wanted = builder.wanted(["sequence_length", "output_ids", "batch_index", "not_an_output"])
    assert wanted == ("output_ids", "sequence_length", "batch_index")
    built = dict(builder.build(OutputBuilder.ALL, 1, 100, 0, 300, [7, 8, 9], [-0.5, -1.0, -2.0], -3.5))
    assert list(built) == list(OutputBuilder.ALL)
    np.testing.assert_array_equal(built["output_ids"], np.array([[[7, 8, 9]]], np.int32))
    assert built["output_ids"].dtype == np.int32
    assert built["sequence_length"].tolist() == [[3]]
    assert built["output_log_probs"].shape == (1, 1, 3) and built["output_log_probs"].dtype == np.float32
    assert built["cum_log_probs"].tolist() == [[-3.5]]
    assert built["batch_index"].tolist() == [[1]]
    assert built["first_token_time_ns"].tolist() == [[300]]  # no first token yet: now
    assert built["arrival_time_ns"].dtype == np.int64 and built["arrival_time_ns"].tolist() == [[100]]
    assert built["context_logits"].shape == (1, 1, 1) and built["generation_logits"].shape == (1, 1, 1, 1)
    assert built["context_phase_params"].shape == (1, 0) and built["context_phase_params"].dtype == np.uint8


def test_merged_tokens_never_split_a_character(tiny_mpt_job: PipelineResult) -> None:
    from generator.formats.tokenizer import load_tokenizer
    from generator.serving.triton_models.common import ChunkDecoder, Utf8HoldBack
    from generator.serving.triton_models.responder import hold_back_each

    tokenizer = load_tokenizer(tiny_mpt_job.tokenizer_dir)
    text = "ab 世界 🙂 é x 数据 ok"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # byte-level: characters span several tokens
    decoder = ChunkDecoder(tokenizer)
    for merge in (1, 2, 3, 4, 5, 7):  # tokens per merged result
        holdback = Utf8HoldBack(lambda chunk: tokenizer.decode(chunk, skip_special_tokens=False))
        pieces = []
        for start in range(0, len(ids), merge):
            ready = hold_back_each(holdback, ids[start:start + merge])
            if ready:
                pieces.append(decoder.decode(ready))
        pieces.append(decoder.decode(holdback.flush()))
        assert "".join(pieces) == text, merge
        assert all("\ufffd" not in piece for piece in pieces), (merge, pieces)


def _result(token: int, finished: bool) -> GenerationResult:
    return GenerationResult(0, [token], finished)


def test_final_results_are_answered_before_other_streams_tokens() -> None:
    """A request's final result goes out ahead of the tokens of streams queued before it (its client waits on it
    to send the next request); the order within each request stays."""
    order: list[tuple[str, list[int], bool]] = []
    hold = threading.Event()
    answered = threading.Semaphore(0)

    def respond(pending: Any, item: Any, result: Any) -> None:
        if pending == "first":
            hold.wait(10)  # keeps the only thread busy while the others queue up
        order.append((pending, result.token_ids, result.finished))
        answered.release()

    responder = Responder(respond, threads=1)
    try:
        item = _Item(streaming=True)
        responder.push("first", item, _result(0, False))
        time.sleep(0.1)  # the thread now holds "first"
        responder.push("a", item, _result(1, False))
        responder.push("b", item, _result(2, False))
        responder.push("c", item, _result(3, False))
        responder.push("c", item, _result(4, True))
        hold.set()
        for _ in range(4):
            assert answered.acquire(timeout=10)
    finally:
        responder.close()
    assert [entry[0] for entry in order] == ["first", "c", "a", "b"]
    assert order[1] == ("c", [3, 4], True)  # merged, in order, final last
