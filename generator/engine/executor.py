"""The executor: a request queue and a step-loop thread doing in-flight batching with a paged KV cache.

Three parts with small interfaces between them (as nano-vllm and vLLM's v1 engine split theirs):
- the `Scheduler` (scheduler.py) picks each step's work under the `max_num_tokens` budget: every running
  sequence's next token, chunks of new prompts, preemption when the pool runs out of blocks;
- the `BlockManager` (block_manager.py) hands out the pool's blocks and shares full prefix blocks;
- the `ModelRunner` (model_runner.py) turns the step into one forward (decode rows and prefill chunks
  together) over the rank's KV pool, as a CUDA-graph replay when the step is all decodes.
The loop here samples the rows whose chunk reached their sequence's end, hands out results and retires
finished requests. Requests therefore join and leave between steps, as in TensorRT-LLM's in-flight batcher,
and a new prompt never stalls the running streams for more than one chunk.

Multi-rank: rank 0 owns the executor and broadcasts each forward's `ForwardPlan`; the other ranks run
`follow(engine_dir)`, which replays the plans until rank 0 shuts down.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from generator.engine.block_manager import BlockManager
from generator.engine.config import EngineConfig, load_engine_config
from generator.engine.cuda_graphs import DeviceTokens
from generator.engine.distributed import Communicator, pick_device
from generator.engine.kv_cache import KVCacheSettings
from generator.engine.model import DecoderModel, ForwardPlan
from generator.engine.model_runner import ModelRunner
from generator.engine.rank_env import process_info
from generator.engine.requests import (
    Callback,
    GenerationRequest,
    GenerationResult,
    RequestLimits,
    SamplingConfig,
    validate_request,
)
from generator.engine.sampling import SequenceState, mask_min_tokens, new_generator, sample
from generator.engine.scheduler import Scheduled, Scheduler, Sequence, parse_prefill_wait_steps
from generator.errors import ConfigError

log = logging.getLogger(__name__)

# kinds of the step messages rank 0 sends the other ranks (distributed.QUIET is the third)
_FORWARD = 0
_SHUTDOWN = 1
_FORWARD_WITH_TOKENS = 2  # a forward whose decode rows take the previous step's tokens, sent on the device

#: takes one step's results at once (`EngineProcess`'s child sends them to the parent as one message)
ResultSink = Callable[[list[tuple[Callback, GenerationResult]]], None]




@dataclass(eq=False)
class _Running:
    request_id: int
    request: GenerationRequest
    callback: Callback
    state: SequenceState
    sequence: Sequence
    log_probs: list[float] = field(default_factory=list)
    scheduled_ns: int = 0


_PLACEHOLDER = -1  # an output token sampled on the device, not yet fetched (see Executor._launch_fetch)


@dataclass
class _InFlight:
    """A step whose sampled tokens are still on their way to the host."""

    requests: list[_Running]
    tokens: torch.Tensor          # on the device
    host: torch.Tensor            # their copy (pinned on CUDA), valid once `event` completed
    event: torch.cuda.Event | None


def _set_cpu_threads(world_size: int, device: torch.device) -> None:
    # several ranks on a small CPU host: one thread each, or they fight over the cores
    if world_size > 1 and device.type == "cpu":
        torch.set_num_threads(1)


def _load_rank(engine_dir: Path, device: str | None, weights: dict[str, torch.Tensor] | None = None
               ) -> tuple[EngineConfig, Communicator, DecoderModel]:
    config = load_engine_config(Path(engine_dir))
    info = process_info()
    if info.world_size != config.world_size:
        raise ConfigError(f"the engine needs {config.world_size} ranks (tp_size {config.mapping.tensor_parallel_size}"
                          f" x pp_size {config.mapping.pipeline_parallel_size}) but this launch has "
                          f"{info.world_size}: run it under `mpirun -n {config.world_size}`")
    mapping = config.mapping.with_rank(info.rank)
    torch_device = pick_device(info.local_rank, device)
    _set_cpu_threads(config.world_size, torch_device)
    comm = Communicator(mapping, torch_device)
    model = DecoderModel(config, Path(engine_dir), comm, torch_device, weights)
    comm.enable_peer_all_reduce(model.dtype, model.fused_norm)
    return config, comm, model


def follow(engine_dir: Path | str, device: str | None = None, weights: dict[str, torch.Tensor] | None = None
           ) -> None:
    """Run a rank > 0: load this rank's weights (or take `weights`, see `DecoderModel`), then replay rank 0's
    forwards until it shuts down."""
    config, comm, model = _load_rank(Path(engine_dir), device, weights)
    if comm.mapping.rank == 0:
        raise ConfigError("follow() is for ranks > 0; rank 0 creates the Executor")
    if model.device.type == "cuda":
        torch.cuda.set_device(model.device)
    settings, max_num_tokens = comm.broadcast_plan(None)  # rank 0's: every pool must match
    runner = ModelRunner(model, settings, max_num_tokens)
    runner.warmup()
    with torch.inference_mode():
        while True:
            message = comm.broadcast_step(None)
            kind = int(message[0])
            if kind == _SHUTDOWN:
                break
            if kind in (_FORWARD, _FORWARD_WITH_TOKENS):
                runner.execute(*_receive_forward(comm, message))
    runner.release()
    comm.close()


def _forward_message(plan: ForwardPlan, device_tokens: DeviceTokens | None) -> np.ndarray:
    """A forward as a step message: [_FORWARD, plan...], or [_FORWARD_WITH_TOKENS, rows, count, rows...,
    sources..., plan...] when decode rows take tokens still on rank 0's device (they follow the message)."""
    if device_tokens is None or not device_tokens[0]:
        return np.concatenate([np.array([_FORWARD], dtype=np.int64), plan.to_array()])
    rows, sources, tokens = device_tokens
    header = np.array([_FORWARD_WITH_TOKENS, len(rows), tokens.numel(), *rows, *sources], dtype=np.int64)
    return np.concatenate([header, plan.to_array()])


def _receive_forward(comm: Communicator, message: np.ndarray) -> tuple[ForwardPlan, DeviceTokens | None]:
    """A follower's side of `_forward_message`: the plan, and the device tokens that follow the message."""
    if int(message[0]) == _FORWARD:
        return ForwardPlan.from_array(message[1:]), None
    rows, count = int(message[1]), int(message[2])
    tokens = comm.broadcast_tokens(None, count)
    sources = message[3 + rows:3 + 2 * rows].tolist()
    return ForwardPlan.from_array(message[3 + 2 * rows:]), (message[3:3 + rows].tolist(), sources, tokens)


class Executor:
    """Rank 0's engine: `enqueue` requests from any thread, results come back through callbacks."""

    def __init__(self, engine_dir: Path | str, device: str | None = None, *,
                 kv_cache_free_gpu_mem_fraction: float | None = None,
                 max_tokens_in_paged_kv_cache: int | None = None,
                 enable_kv_cache_reuse: bool = False, max_num_tokens: int | None = None,
                 result_sink: ResultSink | None = None,
                 weights: dict[str, torch.Tensor] | None = None, prefill_wait_steps: int | None = None) -> None:
        """Load the engine, size the KV pool (`kv_cache_free_gpu_mem_fraction` of the GPU memory free after
        the weights, default 0.9, or `max_tokens_in_paged_kv_cache` tokens), capture the decode graphs, and
        start the step loop. `max_num_tokens` overrides the engine's per-step token budget. `result_sink`, if
        given, takes each step's (callback, result) pairs at once instead of the callbacks being called.
        `weights` replace the rank file (see `DecoderModel`). `prefill_wait_steps` (default: the environment's
        GEN_REPO_PREFILL_WAIT_STEPS, else 0) holds new prompts back up to that many steps while others run, so
        they join together and more steps are pure decodes (see `Scheduler`)."""
        self.engine_dir = Path(engine_dir)
        wait = parse_prefill_wait_steps(prefill_wait_steps)
        config, comm, model = _load_rank(self.engine_dir, device, weights)
        if comm.mapping.rank != 0:
            raise ConfigError(f"rank {comm.mapping.rank} must call generator.engine.follow(), not Executor()")
        fraction = 0.9 if kv_cache_free_gpu_mem_fraction is None else float(kv_cache_free_gpu_mem_fraction)
        if not 0.0 < fraction <= 1.0:
            raise ConfigError(f"kv_cache_free_gpu_mem_fraction must be in (0, 1], got {fraction}")
        if max_tokens_in_paged_kv_cache is not None and max_tokens_in_paged_kv_cache < config.tokens_per_block:
            raise ConfigError(f"max_tokens_in_paged_kv_cache {max_tokens_in_paged_kv_cache} cannot hold one KV "
                              f"block of {config.tokens_per_block} tokens")
        settings = KVCacheSettings(fraction, max_tokens_in_paged_kv_cache, bool(enable_kv_cache_reuse),
                                   config.tokens_per_block)
        self.config = config
        self._comm = comm
        self._model = model
        if model.device.type == "cuda":
            torch.cuda.set_device(model.device)
        self.max_num_tokens = int(max_num_tokens or config.max_num_tokens)
        comm.broadcast_plan((settings, self.max_num_tokens))
        self._runner = ModelRunner(model, settings, self.max_num_tokens)
        self._runner.warmup()
        self._blocks = BlockManager(self._runner.cache.num_blocks, settings.block_size, settings.enable_reuse)
        self.max_batch_size = config.max_batch_size
        self.max_input_len = config.max_input_len
        self.max_seq_len = config.max_seq_len
        self.vocab_size = config.vocab_size
        self.limits = RequestLimits(self.max_input_len, self.max_seq_len, self.vocab_size,
                                    self._runner.cache.num_tokens)
        self._scheduler = Scheduler(self._blocks, self.max_batch_size, self.max_num_tokens, wait)
        self._lock = threading.Condition()
        self._queue: deque[_Running] = deque()        # enqueued, not yet seen by the step loop
        self._active: dict[int, _Running] = {}        # the step loop's: in the scheduler (waiting or running)
        self._by_sequence: dict[Sequence, _Running] = {}
        self._cancelled: set[int] = set()
        self._outbox: list[tuple[Callback, GenerationResult]] = []  # results to hand out (see _flush)
        self._result_sink = result_sink
        self._inflight: _InFlight | None = None
        # lookahead (see _launch_fetch); at several ranks the tokens reach the others on the device
        self._overlap = os.environ.get("GEN_REPO_LOOKAHEAD", "1") != "0"
        self._fetch_buffer = torch.zeros(config.max_batch_size, dtype=torch.long)
        if model.device.type == "cuda":
            self._fetch_buffer = self._fetch_buffer.pin_memory()
        self._ids = itertools.count(1)
        self._stopping = False
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="gen-repo-executor", daemon=True)
        self._thread.start()
        # an executor left running at exit would leave the other ranks waiting for a plan forever
        atexit.register(self.shutdown)

    @property
    def kv_cache_info(self) -> dict[str, int | bool]:
        """The KV pool: blocks (besides the padding block), tokens per block, tokens, bytes, reuse."""
        cache = self._runner.cache
        return {"blocks": cache.num_blocks - 1, "tokens_per_block": cache.block_size, "tokens": cache.num_tokens,
                "bytes": cache.nbytes, "reuse": self._blocks.enable_reuse,
                "preemptions": self._scheduler.num_preemptions, "reused_blocks": self._blocks.num_reused}

    @property
    def prefill_wait_steps(self) -> int:
        """Steps new prompts may wait to join running ones together (the scheduler's)."""
        return self._scheduler.prefill_wait_steps

    @property
    def step_stats(self) -> dict[str, int]:
        """Counters of the forwards run so far: CUDA-graph replays and eager steps (see `ModelRunner.stats`)."""
        return dict(self._runner.stats)

    @property
    def weight_bytes(self) -> int:
        """Bytes of this rank's weights on its device (weight-only GEMMs at their packed size)."""
        return self._model.weight_bytes()

    @property
    def load(self) -> tuple[int, int, float]:
        """(running requests, waiting requests, fraction of the KV pool's blocks in use), read without a lock."""
        scheduler, blocks = self._scheduler, self._blocks
        waiting = len(scheduler.waiting) + len(self._queue)
        return len(scheduler.running), waiting, 1.0 - blocks.num_free / max(1, blocks.capacity)

    # public API -----------------------------------------------------------------------------------------
    def enqueue(self, request: GenerationRequest, callback: Callback) -> int:
        """Queue a request; returns its id. Raises ValueError for a request the engine cannot take."""
        self._validate(request)
        with self._lock:
            if self._stopping:
                raise RuntimeError("the executor is shut down")
            request_id = next(self._ids)
            state = SequenceState(request.sampling, list(request.input_ids), [],
                                  new_generator(request.sampling, self._model.device))
            sequence = Sequence(state.prompt, state.output)
            self._queue.append(_Running(request_id, request, callback, state, sequence))
            self._lock.notify_all()
        return request_id

    def cancel(self, request_id: int) -> None:
        """Stop a queued or running request; it finishes with reason "cancelled" at the next step."""
        with self._lock:
            self._cancelled.add(request_id)
            self._lock.notify_all()

    def generate(self, input_ids: list[int], sampling: SamplingConfig | None = None,
                 timeout: float | None = None) -> GenerationResult:
        """Blocking convenience: run one request and return its final (non-streaming) result."""
        done = threading.Event()
        box: list[GenerationResult] = []

        def on_result(result: GenerationResult) -> None:
            box.append(result)
            done.set()

        self.enqueue(GenerationRequest(list(input_ids), sampling or SamplingConfig()), on_result)
        if not done.wait(timeout):
            raise TimeoutError("generation did not finish in time")
        return box[0]

    def shutdown(self) -> None:
        """Finish queued and running requests as cancelled, stop the loop and release the other ranks."""
        with self._lock:
            if self._closed:
                return
            self._stopping = True
            self._lock.notify_all()
        self._thread.join()
        with self._lock:
            self._closed = True
        atexit.unregister(self.shutdown)

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # validation -----------------------------------------------------------------------------------------
    def _validate(self, request: GenerationRequest) -> None:
        validate_request(request, self.limits)

    # the step loop ----------------------------------------------------------------------------------------
    def _loop(self) -> None:
        if self._model.device.type == "cuda":
            torch.cuda.set_device(self._model.device)  # the current device is per thread
        try:
            with torch.inference_mode():
                while self._step():
                    pass
        except Exception:  # keep going would hide the error; fail every request instead
            log.exception("the executor's step loop crashed")
            self._fail_all("the executor's step loop crashed; see the server log")
        finally:
            self._finish_shutdown()

    def _step(self) -> bool:
        """One step of the loop; False once shutdown was asked."""
        with self._lock:
            idle = not self._stopping and not self._queue and not self._active
        if idle:
            self._flush()
            self._comm.go_quiet()  # the other ranks wait on gloo, not spinning in an NCCL broadcast
        with self._lock:
            while not self._stopping and not self._queue and not self._active:
                self._lock.wait()
            if self._stopping:
                return False
            cancelled = set(self._cancelled)
            self._cancelled.clear()
        self._take_queue()
        for request_id in cancelled:
            running = self._active.get(request_id)
            if running is not None:
                self._finish(running, "cancelled")
        work = self._scheduler.schedule()
        if work:
            self._run_forward(work)
        else:
            if self._inflight is not None:
                inflight, self._inflight = self._inflight, None
                self._resolve(inflight)
            self._flush()
        if not work and self._active:
            raise RuntimeError("the scheduler found nothing to run for waiting requests")  # a bug: never spin
        return True

    def _run_forward(self, work: list[Scheduled]) -> None:
        plan = ForwardPlan([item.sequence.tokens(item.start, item.start + item.count) for item in work],
                           [item.start for item in work], [list(item.sequence.block_table) for item in work])
        requests = [self._by_sequence[item.sequence] for item in work]
        now = time.time_ns()
        for running in requests:
            running.scheduled_ns = running.scheduled_ns or now
        sampled = [row for row, item in enumerate(work) if item.samples]
        inflight, self._inflight = self._inflight, None
        device_tokens = self._device_tokens(inflight, requests) if inflight is not None else None
        try:
            if self._comm.world_size > 1:
                self._broadcast_forward(plan, device_tokens)
            logits = self._runner.execute(plan, device_tokens)
            self._flush()  # the previous step's results, while this step runs on the GPU
            if inflight is not None:
                self._resolve(inflight)  # likewise: the previous step's tokens reach the host now
                self._flush()
            assert logits is not None
            self._scheduler.computed(work)  # after _resolve: no placeholder is hashed
            if not sampled:
                return
            if len(sampled) < len(work):
                logits = logits[torch.tensor(sampled, device=logits.device)]
            states = [requests[row].state for row in sampled]
            if self._overlap and all(s.config.is_greedy and not s.config.needs_processing
                                     and not s.config.return_log_probs for s in states):
                self._launch_fetch([requests[row] for row in sampled], mask_min_tokens(logits, states).argmax(dim=-1))
                return
            new_tokens, log_probs = sample(logits, states)
        except Exception as error:  # noqa: BLE001 - report it on the requests, keep serving
            log.exception("forward failed")
            for running in requests + (inflight.requests if inflight is not None else []):
                self._finish(running, "error", error=f"{type(error).__name__}: {error}")
            self._flush()
            return
        for row, token, log_prob in zip(sampled, new_tokens, log_probs, strict=True):
            self._accept(requests[row], token, log_prob)

    def _broadcast_forward(self, plan: ForwardPlan, device_tokens: DeviceTokens | None) -> None:
        """Send the step to the other ranks; tokens still on the device follow over the tensors' communicator,
        so lookahead works at any world size without a host sync."""
        self._comm.broadcast_step(_forward_message(plan, device_tokens))
        if device_tokens is not None and device_tokens[0]:
            self._comm.broadcast_tokens(device_tokens[2], device_tokens[2].numel())

    # one step of lookahead -----------------------------------------------------------------------------------
    # All-greedy steps do not wait for their tokens: each sampled sequence gets a placeholder token,
    # the next step is scheduled and launched with the real tokens taken on the device, and only then are the
    # tokens fetched (the copy has long finished) and accepted. The host work of a step thus overlaps the GPU.
    # A sequence that turns out finished wasted one row of the next step, nothing else.
    def _launch_fetch(self, requests: list[_Running], tokens: torch.Tensor) -> None:
        host = self._fetch_buffer[:len(requests)]
        host.copy_(tokens, non_blocking=True)
        event = None
        if tokens.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        for running in requests:
            running.state.output.append(_PLACEHOLDER)
        self._inflight = _InFlight(requests, tokens, host, event)

    def _device_tokens(self, inflight: _InFlight, requests: list[_Running]) -> DeviceTokens:
        where = {id(running): index for index, running in enumerate(inflight.requests)}
        rows, sources = [], []
        for row, running in enumerate(requests):
            index = where.get(id(running))
            if index is not None and running.state.output and running.state.output[-1] == _PLACEHOLDER:
                rows.append(row)
                sources.append(index)
        return rows, sources, inflight.tokens

    def _resolve(self, inflight: _InFlight) -> None:
        if inflight.event is not None:
            inflight.event.synchronize()
        for running, token in zip(inflight.requests, inflight.host.tolist(), strict=True):
            if running.request_id not in self._active:
                continue  # finished meanwhile (cancelled): _finish dropped its placeholder
            output = running.state.output
            assert output and output[-1] == _PLACEHOLDER
            output.pop()
            self._accept(running, int(token), None)

    def _accept(self, running: _Running, token: int, log_prob: float | None) -> None:
        """Append a sampled token, then deliver a result and decide whether the request is done."""
        config = running.state.config
        if config.end_id is not None and token == config.end_id:
            self._finish(running, "end_id")
            return
        running.state.output.append(token)
        if log_prob is not None:
            running.log_probs.append(log_prob)
        output = running.state.output
        reason = None
        if any(words and output[-len(words):] == list(words) for words in config.stop_words):
            reason = "stop_words"
        elif len(output) >= config.max_new_tokens:
            reason = "length"
        if reason is not None:
            self._finish(running, reason, last_token=token)
        elif running.request.streaming:
            self._deliver(running, [token], False, None)

    def _finish(self, running: _Running, reason: str, last_token: int | None = None,
                error: str | None = None) -> None:
        """Retire a request of the step loop (gives its KV blocks back) and deliver its final result."""
        if self._active.pop(running.request_id, None) is None:
            return  # already finished
        del self._by_sequence[running.sequence]
        self._scheduler.remove(running.sequence)
        if running.state.output and running.state.output[-1] == _PLACEHOLDER:
            running.state.output.pop()  # a token still on its way: never delivered
        if running.request.streaming:
            tokens = [last_token] if last_token is not None else []
        else:
            tokens = list(running.state.output)
        self._deliver(running, tokens, True, reason, error)

    def _deliver(self, running: _Running, tokens: list[int], finished: bool, reason: str | None,
                 error: str | None = None) -> None:
        log_probs = None
        cum = None
        if running.state.config.return_log_probs:
            # `tokens` are the newest ones when streaming, all of them otherwise: the log probs follow suit
            log_probs = running.log_probs[len(running.log_probs) - len(tokens):]
            cum = float(sum(running.log_probs))
        result = GenerationResult(running.request_id, tokens, finished, reason, log_probs, cum, error,
                                  running.scheduled_ns)
        self._outbox.append((running.callback, result))

    def _flush(self) -> None:
        """Hand out the queued results. Called right after the next forward is launched, so the callbacks
        (a Triton response per token when serving) run while the GPU computes, not between steps."""
        outbox, self._outbox = self._outbox, []
        if self._result_sink is not None:
            if outbox:
                try:
                    self._result_sink(outbox)
                except Exception:  # noqa: BLE001 - as a broken callback below
                    log.exception("the result sink raised")
            return
        for callback, result in outbox:
            try:
                callback(result)
            except Exception:  # noqa: BLE001 - a broken callback must not stop the other requests
                log.exception("callback of request %d raised", result.request_id)

    def _take_queue(self) -> None:
        with self._lock:
            arrived = list(self._queue)
            self._queue.clear()
        for running in arrived:
            self._active[running.request_id] = running
            self._by_sequence[running.sequence] = running
            self._scheduler.add(running.sequence)

    def _fail_all(self, message: str) -> None:
        self._take_queue()
        for running in list(self._active.values()):
            self._finish(running, "error", error=message)
        self._flush()

    def _finish_shutdown(self) -> None:
        self._take_queue()
        for running in list(self._active.values()):
            self._finish(running, "cancelled")
        self._flush()
        try:
            self._comm.broadcast_step(np.array([_SHUTDOWN], dtype=np.int64))
        finally:
            self._runner.release()
            self._comm.close()


def run_prompts(engine_dir: Path | str, prompts: list[list[int]], sampling: SamplingConfig | None = None,
                device: str | None = None) -> list[GenerationResult]:
    """Generate for every prompt at once (in-flight batched) and return the final results in prompt order."""
    with Executor(engine_dir, device=device) as executor:
        events = [threading.Event() for _ in prompts]
        results: list[GenerationResult | None] = [None] * len(prompts)

        def callback_for(index: int) -> Callback:
            def on_result(result: GenerationResult) -> None:
                results[index] = result
                events[index].set()
            return on_result

        for index, ids in enumerate(prompts):
            executor.enqueue(GenerationRequest(list(ids), sampling or SamplingConfig()), callback_for(index))
        for event in events:
            event.wait()
    return [r for r in results if r is not None]
