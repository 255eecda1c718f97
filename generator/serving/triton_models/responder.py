"""The response path of the `tensorrt_llm` python model, off the engine's step loop.

The executor calls back on its step-loop thread once per new token of every streaming request. Building and
sending a Triton response there (a round trip to the tritonserver process per `send`) stalled the step loop:
at 256 streams it spent 81% of its time in the response path and the GPU idled. Here the callback only appends
the result to its request's buffer; `Responder` threads drain the buffers. Each pass over a request merges
everything that arrived since its last response into one result, so a request whose responses fall behind the
engine gets several tokens per response (the joined tokens, hence the joined text, are unchanged), and the cost
per token falls as the load rises. One request is handled by one thread at a time, so its responses keep their
order and its FINAL response is its last.

`OutputBuilder` builds only the outputs a request asked for, from arrays made once where they never change.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from generator.serving import contract

#: merged results handed to `respond(pending, item, result)`; the callable must not raise
Respond = Callable[[Any, Any, Any], None]


def merge_results(results: list[Any]) -> Any:
    """Consecutive streaming results of one request (each with its new tokens) as one result.

    Only the last result may be finished; its finish reason, cumulative log prob and error stand for the merge.
    """
    if len(results) == 1:
        return results[0]
    last = results[-1]
    tokens: list[int] = []
    log_probs: list[float] | None = None
    for result in results:
        tokens.extend(result.token_ids)
        if result.log_probs is not None:
            log_probs = (log_probs or []) + list(result.log_probs)
    return dataclasses.replace(last, token_ids=tokens, log_probs=log_probs)


def hold_back_each(holdback: Any, tokens: list[int]) -> list[int]:
    """Push merged tokens into a `Utf8HoldBack` one at a time: it then holds back exactly what it held when each
    token came alone. Pushed at once, four or more tokens would be released even when the last ones are half a
    character, and the streamed text would no longer join to the whole text."""
    ready: list[int] = []
    for token in tokens:
        ready.extend(holdback.push([token]))
    return ready


class _Buffer:
    """The results of one Triton request not yet answered, and whether a thread owns the request now."""

    __slots__ = ("pending", "results", "owned", "queued")

    def __init__(self, pending: Any) -> None:
        self.pending = pending
        self.results: list[tuple[Any, Any]] = []   # (item, result) in arrival order
        self.owned = False                          # a responder thread is answering this request
        self.queued = False                         # on the ready queue


class Responder:
    """Threads that turn buffered executor results into responses, one request at a time per thread."""

    def __init__(self, respond: Respond, threads: int = 1, name: str = "tensorrt_llm-responder") -> None:
        self._respond = respond
        self._cond = threading.Condition()
        self._buffers: dict[int, _Buffer] = {}     # id(pending) -> buffer, while results wait or are answered
        self._ready: deque[_Buffer] = deque()
        self._closing = False
        self._threads = [threading.Thread(target=self._run, name=f"{name}-{index}", daemon=True)
                         for index in range(max(1, threads))]
        for thread in self._threads:
            thread.start()

    def push(self, pending: Any, item: Any, result: Any) -> None:
        """Executor callback: remember the result; a responder thread answers it (never blocks on Triton)."""
        with self._cond:
            buffer = self._buffers.get(id(pending))
            if buffer is None:
                buffer = self._buffers[id(pending)] = _Buffer(pending)
            buffer.results.append((item, result))
            if not buffer.owned:  # else its thread queues it again when done
                self._queue(buffer, result.finished)

    def _queue(self, buffer: _Buffer, final: bool) -> None:
        """Put a buffer with results and no thread on the ready queue (under `_cond`): at the back, so every
        request gets its turn, or at the front when `final` (it holds a final result). The client waits on that
        one to send its next request; behind a round of every stream's tokens (~200 ms at 256 streams) it held
        the engine idle."""
        if buffer.queued:
            if not final:
                return
            self._ready.remove(buffer)
        buffer.queued = True
        if final:
            self._ready.appendleft(buffer)
        else:
            self._ready.append(buffer)
        self._cond.notify()

    def close(self, timeout: float = 30.0) -> None:
        """Answer what is buffered, then stop the threads."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._ready and not self._closing:
                    self._cond.wait()
                if not self._ready:
                    return  # closing and nothing left
                buffer = self._ready.popleft()
                buffer.queued = False
                buffer.owned = True
                results, buffer.results = buffer.results, []
            self._answer(buffer.pending, results)
            with self._cond:
                buffer.owned = False
                if buffer.results:  # more came in while we answered
                    self._queue(buffer, any(result.finished for _, result in buffer.results))
                else:
                    self._buffers.pop(id(buffer.pending), None)

    def _answer(self, pending: Any, results: list[tuple[Any, Any]]) -> None:
        """One response per batch item per pass: its results since the last pass, merged in order."""
        by_item: dict[int, tuple[Any, list[Any]]] = {}
        for item, result in results:
            entry = by_item.get(id(item))
            if entry is None:
                by_item[id(item)] = (item, [result])
            else:
                entry[1].append(result)
        for item, item_results in by_item.values():
            if item.streaming:
                self._respond(pending, item, merge_results(item_results))
            else:  # one result per request without streaming; keep any others as they came
                for result in item_results:
                    self._respond(pending, item, result)


class OutputBuilder:
    """The `tensorrt_llm` outputs of one response, only those requested, with constant arrays made once."""

    #: every output of the contract but the token counts, which the model adds itself when asked
    ALL = tuple(tensor.name for tensor in contract.TENSORRT_LLM.outputs if tensor.name not in contract.COUNT_OUTPUTS)

    def __init__(self, tensor: Callable[[str, np.ndarray], Any]) -> None:
        self._tensor = tensor  # pb_utils.Tensor

        def const(value: Any, dtype: Any, shape: tuple[int, ...] = (1, 1)) -> np.ndarray:
            array = np.full(shape, value, dtype=dtype)
            array.flags.writeable = False
            return array

        # never-changing outputs: logits are never returned (asking for them is an error), so a [1, 1, 1] /
        # [1, 1, 1, 1] zero stands in; no draft model, no KV-cache block statistics
        self._constants = {
            "context_logits": const(0.0, np.float32, (1, 1, 1)),
            "generation_logits": const(0.0, np.float32, (1, 1, 1, 1)),
            "sequence_index": const(0, np.int32),
            "context_phase_params": const(0, np.uint8, (1, 0)),
            "kv_cache_alloc_new_blocks": const(0, np.int32),
            "kv_cache_reused_blocks": const(0, np.int32),
            "kv_cache_alloc_total_blocks": const(0, np.int32),
            "acceptance_rate": const(0.0, np.float32),
            "total_accepted_draft_tokens": const(0, np.int32),
            "total_draft_tokens": const(0, np.int32),
        }
        self._rows = [const(row, np.int32) for row in range(8)]

    def wanted(self, requested: Any) -> tuple[str, ...]:
        """The outputs to build for a request whose `requested_output_names()` is `requested` (all if none)."""
        names = set(requested or ())
        chosen = tuple(name for name in self.ALL if name in names)
        return chosen if names else self.ALL

    def build(self, wanted: tuple[str, ...], row: int, arrival_ns: int, first_token_ns: int, now: int,
              tokens: list[int], log_probs: list[float], cum_log_prob: float | None) -> list[Any]:
        """The response's tensors, in `wanted` order."""
        tensor = self._tensor
        constants = self._constants
        out = []
        for name in wanted:
            constant = constants.get(name)
            if constant is not None:
                out.append(tensor(name, constant))
            elif name == "output_ids":
                out.append(tensor(name, np.array(tokens, dtype=np.int32).reshape(1, 1, len(tokens))))
            elif name == "sequence_length":
                out.append(tensor(name, np.array([[len(tokens)]], dtype=np.int32)))
            elif name == "cum_log_probs":
                out.append(tensor(name, np.array([[cum_log_prob or 0.0]], dtype=np.float32)))
            elif name == "output_log_probs":
                out.append(tensor(name, np.array(log_probs, dtype=np.float32).reshape(1, 1, len(log_probs))))
            elif name == "batch_index":
                out.append(tensor(name, self._rows[row] if row < len(self._rows)
                                  else np.array([[row]], dtype=np.int32)))
            elif name in ("arrival_time_ns", "first_scheduled_time_ns"):
                out.append(tensor(name, np.array([[arrival_ns]], dtype=np.int64)))
            elif name == "first_token_time_ns":
                out.append(tensor(name, np.array([[first_token_ns or now]], dtype=np.int64)))
            elif name == "last_token_time_ns":
                out.append(tensor(name, np.array([[now]], dtype=np.int64)))
        return out
