"""LLM metrics of the `tensorrt_llm` python model, exported on Triton's /metrics with `pb_utils.MetricFamily`.

Names follow Prometheus conventions (base units in the name, `_total` on counters) under the `gen_repo_`
namespace, each with one `model` label (plus `reason` on finished requests):

- histograms `gen_repo_time_to_first_token_seconds`, `gen_repo_inter_token_latency_seconds`,
  `gen_repo_e2e_request_latency_seconds`, `gen_repo_request_queue_time_seconds`;
- gauges `gen_repo_num_requests_running`, `gen_repo_num_requests_waiting`, `gen_repo_kv_cache_usage_ratio`;
- counters `gen_repo_prompt_tokens_total`, `gen_repo_generation_tokens_total`,
  `gen_repo_requests_finished_total{reason=length|end_id|stop_words|cancelled|error}`.

Times are measured in the model from the request's arrival in `execute`. Time to first token and inter-token
latency are observed for streaming requests only (a non-streaming request's tokens all arrive at once); the
inter-token latency is one observation per request, its mean gap ((last - first token) / (tokens - 1)), as
genai-perf / AIPerf define it. Queue time runs from arrival to the step that first schedules the request (`GenerationResult.scheduled_ns`).
KV-cache usage is the fraction of the engine's paged KV pool's blocks in use (`Executor.load`).

Every metric update is an IPC to tritonserver, so the step loop only updates a few integers; a thread of its
own pushes the observations, counts and gauges every `period_s`.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

PREFIX = "gen_repo_"
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0]
ITL_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
               0.5, 0.75, 1.0, 2.5]
LATENCY_BUCKETS = [0.01, 0.05, 0.1, 0.3, 0.5, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                   120.0]
REASONS = ("length", "end_id", "stop_words", "cancelled", "error")


class _Request:
    """What the metrics keep of one executor request while it runs."""

    __slots__ = ("arrival_ns", "scheduled_ns", "first_ns", "last_ns", "tokens", "streaming")

    def __init__(self, arrival_ns: int, streaming: bool) -> None:
        self.arrival_ns = arrival_ns
        self.scheduled_ns = 0
        self.first_ns = 0
        self.last_ns = 0
        self.tokens = 0
        self.streaming = streaming


class LLMMetrics:
    """Collects per-request timings and token counts from executor results and exports them."""

    def __init__(self, model_name: str, executor: Any, pb_utils: Any, period_s: float = 0.5) -> None:
        self.executor = executor
        self.period_s = period_s
        labels = {"model": model_name}
        family = pb_utils.MetricFamily
        self._families: list[Any] = []  # a family must outlive its metrics (else every update fails)

        def new_family(name: str, description: str, kind: Any) -> Any:
            self._families.append(family(name=PREFIX + name, description=description, kind=kind))
            return self._families[-1]

        def histogram(name: str, description: str, buckets: list[float]) -> Any:
            return new_family(name, description, family.HISTOGRAM).Metric(labels=labels, buckets=buckets)

        def single(name: str, description: str, kind: Any) -> Any:
            return new_family(name, description, kind).Metric(labels=labels)

        self._ttft = histogram("time_to_first_token_seconds", "Time from arrival to the first token (streaming)",
                               TTFT_BUCKETS)
        self._itl = histogram("inter_token_latency_seconds", "Mean gap between a request's tokens (streaming)",
                              ITL_BUCKETS)
        self._e2e = histogram("e2e_request_latency_seconds", "Time from arrival to the last token",
                              LATENCY_BUCKETS)
        self._queue = histogram("request_queue_time_seconds", "Time from arrival to admission by the executor",
                                LATENCY_BUCKETS)
        self._running = single("num_requests_running", "Requests in the engine's running batch", family.GAUGE)
        self._waiting = single("num_requests_waiting", "Requests waiting to be scheduled", family.GAUGE)
        self._kv_usage = single("kv_cache_usage_ratio", "Fraction of the paged KV-cache blocks in use",
                                family.GAUGE)
        self._prompt_tokens = single("prompt_tokens_total", "Prompt tokens of finished requests", family.COUNTER)
        self._generation_tokens = single("generation_tokens_total", "Generated tokens", family.COUNTER)
        finished = new_family("requests_finished_total", "Finished requests by reason", family.COUNTER)
        self._finished = {reason: finished.Metric(labels={**labels, "reason": reason}) for reason in REASONS}
        self._lock = threading.Lock()
        self._requests: dict[int, _Request] = {}
        self._observations: list[tuple[Any, float]] = []
        self._counts: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._export_loop, name="gen-repo-metrics", daemon=True)
        self._thread.start()

    def on_result(self, result: Any, arrival_ns: int, prompt_tokens: int, streaming: bool) -> None:
        """An executor result (step-loop thread): count its tokens; a finished one's timings are queued."""
        now = time.time_ns()
        with self._lock:
            request = self._requests.get(result.request_id)
            if request is None:
                request = self._requests[result.request_id] = _Request(arrival_ns, streaming)
            if request.scheduled_ns == 0:
                request.scheduled_ns = getattr(result, "scheduled_ns", 0)
            new_tokens = len(result.token_ids)
            if new_tokens:
                if request.first_ns == 0:
                    request.first_ns = now
                request.last_ns = now
                request.tokens += new_tokens
                self._counts["generation"] += new_tokens
            if not result.finished:
                return
            del self._requests[result.request_id]
            reason = result.finish_reason if result.finish_reason in REASONS else "error"
            self._counts[reason] += 1
            self._counts["prompt"] += prompt_tokens
            seconds = 1e-9
            self._observations.append((self._e2e, (now - request.arrival_ns) * seconds))
            if request.scheduled_ns:
                self._observations.append((self._queue, max(0, request.scheduled_ns - request.arrival_ns) * seconds))
            if request.streaming and request.first_ns:
                self._observations.append((self._ttft, (request.first_ns - request.arrival_ns) * seconds))
                if request.tokens > 1:
                    self._observations.append(
                        (self._itl, (request.last_ns - request.first_ns) * seconds / (request.tokens - 1)))

    def _export_loop(self) -> None:
        while not self._stop.wait(self.period_s):
            self.export()

    def export(self) -> None:
        """Push the queued observations and counts and refresh the gauges (one IPC per update)."""
        with self._lock:
            observations, self._observations = self._observations, []
            counts, self._counts = self._counts, Counter()
        try:
            for metric, value in observations:
                metric.observe(value)
            if counts["prompt"]:
                self._prompt_tokens.increment(counts["prompt"])
            if counts["generation"]:
                self._generation_tokens.increment(counts["generation"])
            for reason in REASONS:
                if counts[reason]:
                    self._finished[reason].increment(counts[reason])
            running, waiting, usage = self.engine_load()
            self._running.set(running)
            self._waiting.set(waiting)
            self._kv_usage.set(usage)
        except Exception:  # noqa: BLE001 - tritonserver going away mid-export: metrics are best effort
            pass

    def engine_load(self) -> tuple[int, int, float]:
        """(running requests, waiting requests, KV-cache block usage) from the executor."""
        return self.executor.load

    def close(self) -> None:
        """Stop the export thread after a last export."""
        self._stop.set()
        self._thread.join(timeout=5)
        self.export()


def new_metrics(model_name: str, executor: Any, pb_utils: Any) -> LLMMetrics | None:
    """The model's metrics, or None where the python backend has no custom metrics (or no histograms)."""
    family = getattr(pb_utils, "MetricFamily", None)
    if family is None or not hasattr(family, "HISTOGRAM"):
        return None
    return LLMMetrics(model_name, executor, pb_utils)
