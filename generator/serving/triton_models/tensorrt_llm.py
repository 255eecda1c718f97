"""Triton python model `tensorrt_llm` for the pytorch engine backend: runs `generator.engine.Executor`.

Inputs and outputs as TensorRT-LLM 1.x's inflight_batcher_llm/tensorrt_llm (a superset of tensorrtllm_backend
c2e65b8), so the anchor's ensemble and BLS drive it unchanged. `return_num_input_tokens` /
`return_num_output_tokens` add `num_input_tokens` (the prompt's length) and `num_output_tokens` (the generated
tokens this response carries: the new ones when streaming, so their sum is the total; all of them otherwise) to
every response of the request, as TensorRT-LLM's backend does for Triton's OpenAI frontend.

Every request ends with exactly one FINAL response (or an error with FINAL), whatever happens: bad input, an
exception while parsing, a failed send, client cancellation, or the model being unloaded with requests in
flight (`finalize` ends them with an error). Requests go into the executor's queue and are batched in flight with the
others. The executor's callback only hands each result to the responder (`responder.py`), whose thread merges
what arrived for a request since its last response into one response and sends it (decoupled) or keeps it for
`execute` to return (non-decoupled: no streaming, one batch item per request): the step loop never waits on
Triton.

Inputs we cannot honour are answered with an error naming them (beam search, LoRA, prompt tables, logits,
guided decoding, ...). Multi-rank: rank 0 creates the Executor; ranks > 0 follow rank 0 inside `initialize`
and never finish loading, as TensorRT-LLM's leader mode does.
"""

from __future__ import annotations

import functools
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import triton_python_backend_utils as pb_utils

from generator.errors import ConfigError
from generator.serving import contract
from generator.serving.triton_models.common import (
    RequestError,
    RequestInputs,
    Utf8HoldBack,
    configured_tokenizer,
    from_word_list_format,
    is_cancelled,
    load_model_config,
    parameter,
    parse_bool,
)
from generator.serving.triton_models.metrics import new_metrics
from generator.serving.triton_models.responder import OutputBuilder, Responder, hold_back_each

if TYPE_CHECKING:
    from generator.engine import EngineProcess, Executor, GenerationResult, SamplingConfig

NOT_SUPPORTED = "not supported by the pytorch engine"
#: threads answering executor results (the `response_threads` parameter overrides it). Triton's send releases
#: the GIL and tritonserver takes responses on a thread pool, so more threads overlap the round trips, but each
#: sends more, smaller responses (less merging); on 2 CPU cores one thread served 128 streams best. The
#: responses of one request never run on two threads at once.
RESPONDER_THREADS = 1
#: at most this many requests are asked is_cancelled() per cancellation_check_period_ms (round robin): each ask
#: is a round trip to tritonserver, and asking all of them every period under load starved the response path
CANCEL_CHECKS_PER_PERIOD = 16
#: inputs answered with an error whenever they are sent
_UNSUPPORTED_INPUTS = contract.TENSORRT_LLM.unsupported_inputs()
#: scalar inputs accepted at their neutral value only: name -> (neutral value, what it needs)
_NEUTRAL_ONLY: dict[str, tuple[int | bool | None, str]] = {
    "beam_width": (1, "beam search (beam_width > 1)"),
    "num_return_sequences": (1, "num_return_sequences > 1"),
    "return_context_logits": (False, "return_context_logits"),
    "return_generation_logits": (False, "return_generation_logits"),
    "runtime_top_p_min": (None, "runtime_top_p_min"),
    "runtime_top_p_decay": (None, "runtime_top_p_decay"),
    "runtime_top_p_reset_ids": (None, "runtime_top_p_reset_ids"),
}


#: float inputs checked before they reach the sampler: name -> (lower bound or None, bound allowed)
_FLOAT_RANGES = (
    ("temperature", 0.0, True), ("runtime_top_p", 0.0, True), ("repetition_penalty", 0.0, False),
    ("presence_penalty", None, True), ("frequency_penalty", None, True), ("len_penalty", None, True),
)


def _row_scalar(array: np.ndarray | None, row: int) -> Any:
    """Batch item `row` of a scalar input ([batch] after reshape, or [batch, 1])."""
    if array is None:
        return None
    flat = array.reshape(array.shape[0], -1) if array.ndim else array.reshape(1, 1)
    return flat[row if flat.shape[0] > 1 else 0, 0].item()


@dataclass
class _Item:
    """One batch item of a Triton request, as one executor request."""

    row: int
    prompt: list[int]
    exclude_input: bool
    streaming: bool
    holdback: Utf8HoldBack | None
    request_id: int | None = None
    held_log_probs: list[float] = field(default_factory=list)
    first_token_ns: int = 0
    done: bool = False
    return_num_input_tokens: bool = False
    return_num_output_tokens: bool = False


@dataclass
class _Pending:
    """A Triton request in flight: its batch items, how it answers, and its timings."""

    request: pb_utils.InferenceRequest
    items: list[_Item]
    sender: pb_utils.InferenceResponseSender | None
    arrival_ns: int
    batch_size: int
    responses: list[pb_utils.InferenceResponse] = field(default_factory=list)  # non-decoupled: collected here
    wanted: tuple[str, ...] = OutputBuilder.ALL  # the outputs the request asked for
    finished: threading.Event = field(default_factory=threading.Event)
    failed: bool = False
    client_id: str = ""  # the request id the client gave, which a `stop` request names
    # Set, under `lock`, when the FINAL response goes out: Triton then frees the request, and asking
    # it `is_cancelled()` afterwards crashes tritonserver 2.51 (TRITONBACKEND_ResponseFactoryIsCancelled).
    final_sent: bool = False
    # Held while the FINAL response is sent and while the watcher asks is_cancelled(): per request, so that the
    # watcher's round trips to tritonserver never hold up the responses of other requests.
    lock: threading.Lock = field(default_factory=threading.Lock)


class TritonPythonModel:
    """The `tensorrt_llm` model on the pytorch engine: Triton requests in, executor results out."""

    def initialize(self, args: dict[str, Any]) -> None:
        config = load_model_config(args)
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        engine_dir = parameter(config, "gpt_model_path") or parameter(config, "engine_dir")
        if engine_dir is None:
            raise pb_utils.TritonModelException("tensorrt_llm: parameter gpt_model_path is not set")
        from generator.engine.rank_env import process_info

        # the launcher's variables (mpirun, MPICH or generator.serving.local_launch), read the way the engine reads them
        rank = process_info().rank
        if rank > 0:
            from generator.engine import follow

            follow(engine_dir)  # serves rank 0's steps until it shuts down
            raise pb_utils.TritonModelException(f"rank {rank}: rank 0 has shut down")
        # the KV cache parameters of the anchor's config.pbtxt size the engine's paged KV pool
        fraction = parameter(config, "kv_cache_free_gpu_mem_fraction")
        max_kv_tokens = parameter(config, "max_tokens_in_paged_kv_cache")
        options: dict[str, Any] = {"kv_cache_free_gpu_mem_fraction": float(fraction) if fraction else None,
                                   "max_tokens_in_paged_kv_cache": int(max_kv_tokens) if max_kv_tokens else None,
                                   "enable_kv_cache_reuse": parse_bool(parameter(config, "enable_kv_cache_reuse"), False)}
        # ours, not the anchor's: new prompts wait up to this many steps to be prefilled together (see Scheduler)
        wait = parameter(config, "prefill_wait_steps")
        if wait:
            from generator.engine.scheduler import parse_prefill_wait_steps

            try:
                options["prefill_wait_steps"] = parse_prefill_wait_steps(wait)
            except ConfigError as error:
                raise pb_utils.TritonModelException(f"tensorrt_llm: {error}") from None
        # the step loop in a process of its own, so that this process's response threads never hold it up
        # (`engine_process` false: in this process, as before; for A/B measurements)
        in_child = parse_bool(parameter(config, "engine_process"), True)
        self.executor: Executor | EngineProcess | None
        if in_child:
            from generator.engine.process import EngineProcess

            self.executor = EngineProcess(engine_dir, on_exit=self._engine_died, **options)
        else:  # loads torch into this process
            from generator.engine.executor import Executor

            self.executor = Executor(engine_dir, **options)
        self.metrics = new_metrics(args["model_name"], self.executor, pb_utils)  # LLM metrics on /metrics
        self.exclude_input_default = parse_bool(parameter(config, "exclude_input_in_output"), False)
        self.tokenizer = configured_tokenizer(config)  # only to hold back split UTF-8 characters when streaming
        self.cancel_period_s = int(parameter(config, "cancellation_check_period_ms", "100")) / 1000.0
        self._lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}  # executor request id -> its Triton request
        self._stop = threading.Event()
        self._builder = OutputBuilder(pb_utils.Tensor)
        # results are answered on the responder's threads: the step loop never waits on Triton's send
        self._responder = Responder(self._on_result,
                                    threads=int(parameter(config, "response_threads", str(RESPONDER_THREADS))))
        self._cancel_thread = threading.Thread(target=self._watch_cancellations, daemon=True)
        self._cancel_thread.start()

    def _engine_died(self, reason: str) -> None:
        """The engine process died (OOM killer, a CUDA fault, kill -9): the requests in flight have their error
        results; answer them, then end this stub, so that tritonserver stops routing requests here and
        `gen-repo serve` reports the model dead and stops, as when the stub itself dies."""
        pb_utils.Logger.log_error(f"tensorrt_llm: {reason}; ending this model's stub")
        responder = getattr(self, "_responder", None)  # None: it died before initialize finished
        if responder is not None:
            responder.close(timeout=10.0)
        os._exit(1)

    def _executor(self) -> Executor | EngineProcess:
        """The executor, which exists from `initialize` (rank 0) until `finalize`."""
        if self.executor is None:
            raise RequestError("tensorrt_llm: the model is shutting down")
        return self.executor

    # requests -> executor ---------------------------------------------------------------------------------
    def execute(self, requests: list[pb_utils.InferenceRequest]) -> list[pb_utils.InferenceResponse] | None:
        # non-decoupled: one slot per request, in the requests' order (a pending request or its response)
        slots: list[_Pending | pb_utils.InferenceResponse] = []
        for request in requests:
            try:
                pending = self._start(RequestInputs(request))
                slots.append(pending if pending is not None else pb_utils.InferenceResponse(output_tensors=[]))
            except RequestError as error:
                slots.append(self._fail(request, str(error)))
            except Exception as error:  # a parsing bug must still end this request, and not the others
                slots.append(self._fail(request, f"tensorrt_llm: {error!r}"))
        if self.decoupled:
            return None
        responses = []
        for slot in slots:
            if isinstance(slot, _Pending):
                slot.finished.wait()
                responses.append(slot.responses[0])
            else:
                responses.append(slot)
        return responses

    def _fail(self, request: pb_utils.InferenceRequest, message: str) -> pb_utils.InferenceResponse:
        """The error response of a request that never started (decoupled: sent with FINAL at once)."""
        response = pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))
        if self.decoupled:
            request.get_response_sender().send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return response

    def _start(self, inputs: RequestInputs) -> _Pending | None:
        """Parse a Triton request into executor requests and enqueue them."""
        from generator.engine import GenerationRequest

        arrival_ns = time.time_ns()
        request = inputs.request
        if bool(_row_scalar(inputs.get("stop"), 0) or False):
            self._stop_request(request)
            return None
        self._reject_unsupported(inputs)
        executor = self._executor()
        input_ids = inputs.get("input_ids")
        if input_ids is None:
            raise RequestError("input_ids is required for decoder-only engines")
        input_ids = input_ids.reshape(input_ids.shape[0], -1)
        batch_size = input_ids.shape[0]
        lengths = inputs.get("input_lengths")
        if batch_size > 1 and not self.decoupled:
            raise RequestError("a request with batch size > 1 needs the decoupled transaction policy")
        items: list[_Item] = []
        samplings: list[SamplingConfig] = []
        for row in range(batch_size):
            length = int(_row_scalar(lengths, row)) if lengths is not None else input_ids.shape[1]
            if not 1 <= length <= input_ids.shape[1]:
                raise RequestError(f"input_lengths {length} must be in 1..{input_ids.shape[1]} (the number of "
                                   f"input_ids sent)")
            prompt = [int(token) for token in input_ids[row, :length]]
            streaming = bool(_row_scalar(inputs.get("streaming"), row) or False)
            if streaming and not self.decoupled:
                raise RequestError("streaming needs the decoupled transaction policy (render with decoupled=True)")
            sent_exclude = _row_scalar(inputs.get("exclude_input_in_output"), row)
            exclude = self.exclude_input_default if sent_exclude is None else bool(sent_exclude)
            holdback = None
            if streaming and self.tokenizer is not None:
                holdback = Utf8HoldBack(lambda ids: self.tokenizer.decode(ids, skip_special_tokens=False))
            items.append(_Item(
                row=row, prompt=prompt, exclude_input=exclude, streaming=streaming, holdback=holdback,
                return_num_input_tokens=bool(_row_scalar(inputs.get("return_num_input_tokens"), row)),
                return_num_output_tokens=bool(_row_scalar(inputs.get("return_num_output_tokens"), row))))
            samplings.append(self._sampling(inputs, row))
        pending = _Pending(request=request, items=items, batch_size=batch_size, arrival_ns=arrival_ns,
                           client_id=request.request_id() or "",
                           sender=request.get_response_sender() if self.decoupled else None,
                           wanted=self._builder.wanted(request.requested_output_names()))
        for item, sampling in zip(items, samplings, strict=True):
            generation_request = GenerationRequest(input_ids=item.prompt, sampling=sampling, streaming=item.streaming)
            try:
                # no lock held here: the executor may call back from its thread before enqueue returns
                item.request_id = executor.enqueue(
                    generation_request, functools.partial(self._on_engine_result, pending, item))
            except ValueError as error:
                pending.failed = True
                for started in items:
                    if started.request_id is not None:
                        executor.cancel(started.request_id)
                raise RequestError(str(error)) from error
            with self._lock:
                if not item.done:
                    self._pending[item.request_id] = pending
        return pending

    def _stop_request(self, request: pb_utils.InferenceRequest) -> None:
        """`stop` = true (TensorRT-LLM's backend): cancel the requests in flight with this request's id, and
        answer the stop request itself with an empty FINAL response."""
        client_id = request.request_id() or ""
        if not client_id:
            raise RequestError("a stop request needs the request id of the request to stop")
        with self._lock:
            to_cancel = [request_id for request_id, pending in self._pending.items()
                         if pending.client_id == client_id and not pending.final_sent]
        for request_id in to_cancel:
            self._executor().cancel(request_id)
        if self.decoupled:
            request.get_response_sender().send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _reject_unsupported(self, request: RequestInputs) -> None:
        beam_width = request.get("beam_width")
        if beam_width is not None and beam_width.size > 0 and (beam_width < 1).any():
            raise RequestError(f"beam_width must be at least 1, got {beam_width.reshape(-1).tolist()}")
        for name in _UNSUPPORTED_INPUTS:
            value = request.get(name)
            if value is not None and value.size > 0:
                raise RequestError(f"input {name} is {NOT_SUPPORTED}")
        for name, (neutral, what) in _NEUTRAL_ONLY.items():
            value = request.get(name)
            if value is None or value.size == 0:
                continue
            if neutral is None or any(v.item() != neutral for v in value.reshape(-1)):
                raise RequestError(f"{what} is {NOT_SUPPORTED}")
        bias = request.get("embedding_bias")
        if bias is not None and bias.size > 0 and np.any(bias != 0):
            raise RequestError(f"embedding_bias is {NOT_SUPPORTED}")
        guide = request.get("guided_decoding_guide_type")
        if guide is not None and guide.size > 0 and any(g not in (b"", "") for g in guide.reshape(-1)):
            raise RequestError(f"guided decoding is {NOT_SUPPORTED}")

    def _sampling(self, request: RequestInputs, row: int) -> SamplingConfig:
        from generator.engine import SamplingConfig

        def value(name: str, default: Any) -> Any:
            found = _row_scalar(request.get(name), row)
            return default if found is None else found

        def words(name: str) -> list[list[int]]:
            array = request.get(name)
            if array is None or array.size == 0:
                return []
            array = array.reshape(array.shape[0], 2, -1)
            return from_word_list_format(array[row if array.shape[0] > 1 else 0])

        max_new_tokens = int(value("request_output_len", 0))
        if max_new_tokens <= 0:
            raise RequestError(f"request_output_len (max_tokens) must be positive, got {max_new_tokens}")
        for name, low, low_inclusive in _FLOAT_RANGES:
            found = _row_scalar(request.get(name), row)
            if found is None:
                continue
            number = float(found)
            if not math.isfinite(number) or (low is not None and (number < low if low_inclusive else number <= low)):
                bound = "" if low is None else f" and {'>=' if low_inclusive else '>'} {low:g}"
                raise RequestError(f"{name} must be a finite number{bound}, got {found}")
        if int(value("min_tokens", 0)) < 0:
            raise RequestError(f"min_tokens must be >= 0, got {int(value('min_tokens', 0))}")
        end_id = _row_scalar(request.get("end_id"), row)
        pad_id = _row_scalar(request.get("pad_id"), row)
        seed = _row_scalar(request.get("seed"), row)
        if seed is None:  # the older name of seed
            seed = _row_scalar(request.get("random_seed"), row)
        return SamplingConfig(
            max_new_tokens=max_new_tokens,
            end_id=None if end_id is None else int(end_id),
            pad_id=None if pad_id is None else int(pad_id),
            temperature=float(value("temperature", 1.0)),
            top_k=int(value("runtime_top_k", 0)),
            top_p=float(value("runtime_top_p", 0.0)),
            seed=None if seed is None else int(seed),
            repetition_penalty=float(value("repetition_penalty", 1.0)),
            presence_penalty=float(value("presence_penalty", 0.0)),
            frequency_penalty=float(value("frequency_penalty", 0.0)),
            min_tokens=int(value("min_tokens", 0)),
            stop_words=words("stop_words_list"),
            bad_words=words("bad_words_list"),
            return_log_probs=bool(value("return_log_probs", False)),
        )

    # executor -> responses ------------------------------------------------------------------------------
    def _on_engine_result(self, pending: _Pending, item: _Item, result: GenerationResult) -> None:
        """Executor callback (step-loop thread): count it for the metrics, hand it to the responder."""
        if self.metrics is not None:
            self.metrics.on_result(result, pending.arrival_ns, len(item.prompt), item.streaming)
        self._responder.push(pending, item, result)

    def _on_result(self, pending: _Pending, item: _Item, result: GenerationResult) -> None:
        """Responder thread: turn a (merged) GenerationResult into a Triton response."""
        try:
            self._respond(pending, item, result)
        except Exception as error:  # never let an exception escape into the executor thread
            try:
                self._send(pending, item, None, error=f"tensorrt_llm: {error}", final_item=True)
            except Exception as send_error:
                pb_utils.Logger.log_error(f"tensorrt_llm: cannot end a request after {error!r}: {send_error!r}")

    def _respond(self, pending: _Pending, item: _Item, result: GenerationResult) -> None:
        if pending.failed or item.done:
            if result.finished:
                self._forget(item)
            return
        now = time.time_ns()
        if item.first_token_ns == 0 and result.token_ids:
            item.first_token_ns = now
        if result.error is not None or result.finish_reason == "error":
            self._send(pending, item, None, error=result.error or "generation failed", final_item=True)
            return
        if result.finish_reason == "cancelled" and self._was_cancelled_by_client(pending):
            self._end_cancelled(pending)
            return
        tokens = list(result.token_ids)
        log_probs = list(result.log_probs or [])
        if item.streaming:
            if item.holdback is not None:
                item.held_log_probs.extend(log_probs)
                tokens = hold_back_each(item.holdback, tokens)  # several tokens when responses were merged
                if result.finished:
                    tokens += item.holdback.flush()
                log_probs, item.held_log_probs = item.held_log_probs[:len(tokens)], item.held_log_probs[len(tokens):]
            if not tokens and not result.finished:
                return
        generated = len(tokens)
        if not item.streaming and not item.exclude_input:
            tokens = item.prompt + tokens
        outputs = self._outputs(pending, item, tokens, log_probs, result.cum_log_prob, now)
        if item.return_num_input_tokens:
            outputs.append(pb_utils.Tensor("num_input_tokens", np.array([[len(item.prompt)]], dtype=np.int32)))
        if item.return_num_output_tokens:
            outputs.append(pb_utils.Tensor("num_output_tokens", np.array([[generated]], dtype=np.int32)))
        self._send(pending, item, outputs, final_item=result.finished)

    def _outputs(self, pending: _Pending, item: _Item, tokens: list[int], log_probs: list[float],
                 cum_log_prob: float | None, now: int) -> list[pb_utils.Tensor]:
        # only the outputs the request asked for (the rest would be dropped by Triton after the copy)
        return self._builder.build(pending.wanted, item.row, pending.arrival_ns, item.first_token_ns, now, tokens,
                                   log_probs, cum_log_prob)

    def _send(self, pending: _Pending, item: _Item, outputs: list[pb_utils.Tensor] | None, error: str | None = None,
              final_item: bool = False) -> None:
        """Send (decoupled) or keep (non-decoupled) one response; FINAL goes with the request's last one."""
        to_cancel: list[int | None] = []
        with self._lock:
            if final_item and not item.done:
                item.done = True
                self._forget(item)
            last = all(i.done for i in pending.items)
            if error is not None:
                # an error ends the whole request: stop its other batch items
                pending.failed = True
                for other in pending.items:
                    if not other.done:
                        other.done = True
                        self._forget(other)
                        to_cancel.append(other.request_id)
                last = True
        for request_id in to_cancel:
            if request_id is not None:
                self._executor().cancel(request_id)
        response = None
        if error is not None:
            response = pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(error))
        elif outputs is not None:
            response = pb_utils.InferenceResponse(output_tensors=outputs)
        if pending.sender is None:
            if response is not None:
                pending.responses.append(response)
            if last:
                if not pending.responses:
                    pending.responses.append(pb_utils.InferenceResponse(output_tensors=[]))
                pending.finished.set()
            return
        if not last:
            if response is not None and not pending.final_sent:  # the watcher may have ended it (cancelled)
                try:
                    pending.sender.send(response)
                except Exception as error:  # e.g. the client went away: stop generating, still end the request
                    self._send(pending, item, None, error=f"tensorrt_llm: sending a response failed: {error}",
                               final_item=True)
            return
        with pending.lock:  # never while the cancellation watcher asks this request is_cancelled()
            if pending.final_sent:
                return
            pending.final_sent = True
            flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
            if response is None:
                pending.sender.send(flags=flags)
            else:
                pending.sender.send(response, flags=flags)

    def _was_cancelled_by_client(self, pending: _Pending) -> bool:
        with pending.lock:
            return not pending.final_sent and is_cancelled(pending.request)

    def _end_cancelled(self, pending: _Pending) -> None:
        """A request the client cancelled: stop its executor requests and send the bare FINAL flag at once."""
        with self._lock:
            open_items = [item for item in pending.items if not item.done]
        for item in open_items:
            if item.request_id is not None:
                self._executor().cancel(item.request_id)
            self._send(pending, item, None, final_item=True)

    def _forget(self, item: _Item) -> None:
        if item.request_id is not None:
            self._pending.pop(item.request_id, None)

    # cancellation -----------------------------------------------------------------------------------------
    def _watch_cancellations(self) -> None:
        """Poll Triton's cancellation flag of the requests in flight and cancel them in the executor.

        At most CANCEL_CHECKS_PER_PERIOD requests per period, round robin by request id, so that under load a
        sweep takes several periods instead of hundreds of round trips to tritonserver every period; and under
        each request's own lock, never the model's, so responses of the others go on meanwhile."""
        last_checked = 0
        while not self._stop.wait(self.cancel_period_s):
            with self._lock:
                in_flight = list(self._pending.items())
            if not in_flight:
                continue
            in_flight.sort(key=lambda entry: entry[0])
            turn = [e for e in in_flight if e[0] > last_checked] + [e for e in in_flight if e[0] <= last_checked]
            turn = turn[:CANCEL_CHECKS_PER_PERIOD]
            last_checked = turn[-1][0]
            # batch items of one request share its pending: ask each request once
            for pending in {id(pending): pending for _, pending in turn}.values():
                with pending.lock:
                    cancelled = not pending.final_sent and is_cancelled(pending.request)
                if cancelled:
                    self._end_cancelled(pending)

    def finalize(self) -> None:
        executor = getattr(self, "executor", None)
        if executor is None:  # ranks > 0, or a failed initialize
            return
        self._stop.set()
        # requests still in flight would otherwise never get their FINAL response
        with self._lock:
            pendings = list({id(p): p for p in self._pending.values()}.values())
        for pending in pendings:
            open_items = [item for item in pending.items if not item.done]
            if open_items:
                try:
                    self._send(pending, open_items[0], None, error="tensorrt_llm: the model is shutting down",
                               final_item=True)
                except Exception as error:  # nothing more can be done for this one
                    pb_utils.Logger.log_error(f"tensorrt_llm: cannot end a request at shutdown: {error!r}")
        executor.shutdown()
        self.executor = None
        self._responder.close()  # after the executor: its last results (cancelled) still get answered
        if self.metrics is not None:
            self.metrics.close()
