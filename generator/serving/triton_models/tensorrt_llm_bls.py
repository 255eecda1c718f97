"""Triton python model `tensorrt_llm_bls`: preprocessing -> tensorrt_llm -> postprocessing through BLS calls.

Same user-facing inputs and outputs as TensorRT-LLM 1.x's inflight_batcher_llm/tensorrt_llm_bls (a superset of
tensorrtllm_backend c2e65b8), for both engine backends (it only talks to the other models). One prompt per request. While streaming, each
response carries the text of the new tokens, or, with the `accumulate_tokens` parameter, the text of all tokens
so far. Each request runs on its own thread, so concurrent requests meet in tensorrt_llm's in-flight batcher.
Every request ends with one FINAL response (an error one when anything failed); a request the client cancelled
stops being answered at once and ends with FINAL too; with the `stop_core_on_cancel` parameter it also stops
its tensorrt_llm request (a `stop` request naming that request's id, as TensorRT-LLM's backend takes it).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from generator.serving import contract
from generator.serving.triton_models.common import (
    RequestError,
    RequestInputs,
    is_cancelled,
    load_model_config,
    parameter,
    parse_bool,
)

# the routes of the ensemble, followed by BLS calls (generator/serving/contract.py)
#: BLS input -> preprocessing input
_PREPROCESSING_INPUTS = {client: name for name, client in contract.PREPROCESSING_INPUTS}
#: preprocessing output -> tensorrt_llm input
_PREPROCESSED = contract.preprocessed_core_inputs()
#: preprocessing outputs that are left out when empty (nothing asked for them)
_SKIP_WHEN_EMPTY = ("EMBEDDING_BIAS", "OUT_PROMPT_TABLE_EXTRA_IDS")
#: BLS input -> tensorrt_llm input (passed through when the client sends it)
_CORE_INPUTS = contract.client_core_inputs()
#: tensorrt_llm outputs passed to the client unchanged
_PASSTHROUGH_OUTPUTS = contract.PASSTHROUGH_OUTPUTS
_UNSUPPORTED = contract.TENSORRT_LLM_BLS.unsupported_inputs()


def _as_batch(array: np.ndarray) -> np.ndarray:
    """A BLS input (batch 1; scalars may arrive reshaped to [1]) as the [1, ...] array the next model expects."""
    return array.reshape(1, *array.shape[1:]) if array.ndim >= 2 else array.reshape(1, -1)


def _output(response: pb_utils.InferenceResponse, name: str) -> np.ndarray:
    """An output the called model always returns."""
    tensor = pb_utils.get_output_tensor_by_name(response, name)
    if tensor is None:
        raise RequestError(f"tensorrt_llm_bls: the response has no output {name}")
    return tensor.as_numpy()


class TritonPythonModel:
    """The `tensorrt_llm_bls` model: one thread per request, chaining the three models by BLS."""

    def initialize(self, args: dict[str, Any]) -> None:
        config = load_model_config(args)
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        self.accumulate_tokens = parse_bool(parameter(config, "accumulate_tokens"), False)
        self.core_model = parameter(config, "tensorrt_llm_model_name", "tensorrt_llm")
        # gen-repo extras, so that several models can share one repository under prefixed names
        self.preprocessing_model = parameter(config, "preprocessing_model_name", "preprocessing")
        self.postprocessing_model = parameter(config, "postprocessing_model_name", "postprocessing")
        if parameter(config, "tensorrt_llm_draft_model_name") is not None:
            raise pb_utils.TritonModelException("tensorrt_llm_bls: speculative decoding with a draft model "
                                                "(tensorrt_llm_draft_model_name) is not supported")
        # Off by default: watching cancellation per response (and stopping tensorrt_llm) made 143 of 1,000
        # cancelled streams under 4 concurrent clients wait 30 s for their first piece on tritonserver 2.51
        # (cause not found yet); without it a cancelled request's generation runs to its end, as before.
        self.stop_core_on_cancel = parse_bool(parameter(config, "stop_core_on_cancel"), False)
        self._threads: set[threading.Thread] = set()
        self._threads_lock = threading.Lock()

    def execute(self, requests: list[pb_utils.InferenceRequest]) -> list[pb_utils.InferenceResponse] | None:
        if not self.decoupled:
            return [self._run_collect(request) for request in requests]
        for request in requests:
            thread = threading.Thread(target=self._run_streaming, args=(request,), daemon=True)
            with self._threads_lock:
                self._threads.add(thread)
            thread.start()
        return None

    # one request ----------------------------------------------------------------------------------------
    def _run_streaming(self, request: pb_utils.InferenceRequest) -> None:
        sender = request.get_response_sender()
        message = None
        core_id = f"bls-{uuid.uuid4().hex}"
        try:
            for response in self._generate(RequestInputs(request), core_id, watch_cancellation=self.stop_core_on_cancel):
                sender.send(response)
        except RequestError as error:
            message = str(error)
        except Exception as error:  # an unexpected failure must still end the stream
            message = f"tensorrt_llm_bls: {error!r}"
        finally:
            # whatever happened above, the request ends here with exactly one FINAL response
            try:
                if message is None:
                    sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                else:
                    sender.send(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message)),
                                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            except Exception as error:
                pb_utils.Logger.log_error(f"tensorrt_llm_bls: cannot end a request: {error!r}")
            with self._threads_lock:
                self._threads.discard(threading.current_thread())

    def _run_collect(self, request: pb_utils.InferenceRequest) -> pb_utils.InferenceResponse:
        try:
            responses = list(self._generate(RequestInputs(request), f"bls-{uuid.uuid4().hex}"))
        except RequestError as error:
            return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(error)))
        except Exception as error:  # one failing request must not take the others of the batch with it
            return pb_utils.InferenceResponse(output_tensors=[],
                                              error=pb_utils.TritonError(f"tensorrt_llm_bls: {error!r}"))
        if len(responses) != 1:
            return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(
                "tensorrt_llm_bls: expected one response from tensorrt_llm without streaming"))
        return responses[0]

    def _stop_core(self, core_id: str) -> None:
        """Ask tensorrt_llm to stop the request `core_id` (best effort: it may have finished already)."""
        inputs = [pb_utils.Tensor("input_ids", np.zeros((1, 1), dtype=np.int32)),
                  pb_utils.Tensor("input_lengths", np.ones((1, 1), dtype=np.int32)),
                  pb_utils.Tensor("request_output_len", np.ones((1, 1), dtype=np.int32)),
                  pb_utils.Tensor("stop", np.ones((1, 1), dtype=bool))]
        try:
            stop = pb_utils.InferenceRequest(model_name=self.core_model, inputs=inputs, request_id=core_id,
                                             requested_output_names=[])
            for _ in stop.exec(decoupled=True):
                pass
        except Exception as error:
            pb_utils.Logger.log_warn(f"tensorrt_llm_bls: could not stop {core_id}: {error!r}")

    def _generate(self, request: RequestInputs, core_id: str,
                  watch_cancellation: bool = False) -> Iterator[pb_utils.InferenceResponse]:
        """Yield the client responses for one request; its tensorrt_llm request has the id `core_id`.

        With `watch_cancellation`, a request the client cancelled yields nothing more (and stops its
        tensorrt_llm request with `stop_core_on_cancel`); the rest of tensorrt_llm's responses are still read to its FINAL one (an iterator left
        unread keeps them in the stub: ~0.2 MB per cancelled request)."""
        for name in _UNSUPPORTED:
            if request.get(name) is not None:
                raise RequestError(f"input {name}: multimodal inputs are not supported by this model")
        draft = request.get("num_draft_tokens")
        if draft is not None and int(draft.reshape(-1)[0]) > 0:
            raise RequestError("num_draft_tokens: speculative decoding is not supported by this model")
        text = request.require("text_input")
        if text.shape[0] != 1:
            raise RequestError(f"tensorrt_llm_bls takes one prompt per request, got a batch of {text.shape[0]}")
        stream = request.get("stream")
        streaming = bool(stream is not None and stream.reshape(-1)[0])
        if streaming and not self.decoupled:
            raise RequestError("streaming needs the decoupled transaction policy (render with decoupled=True)")

        preprocessed = self._preprocess(request)
        core_inputs = [pb_utils.Tensor(core_name, preprocessed[name]) for name, core_name in _PREPROCESSED.items()
                       if not (name in _SKIP_WHEN_EMPTY and preprocessed[name].size == 0)]
        for name, core_name in _CORE_INPUTS.items():
            value = request.get(name)
            if value is None and name == "seed":  # the older name of seed
                value = request.get("random_seed")
            if value is not None:
                core_inputs.append(pb_utils.Tensor(core_name, _as_batch(value)))
        core_request = pb_utils.InferenceRequest(
            model_name=self.core_model, inputs=core_inputs, request_id=core_id,
            requested_output_names=["output_ids", "sequence_length", *_PASSTHROUGH_OUTPUTS])
        core_responses = core_request.exec(decoupled=True) if self.decoupled else [core_request.exec()]
        accumulated: np.ndarray | None = None
        stopped = False
        for core_response in core_responses:
            if stopped:
                continue
            if watch_cancellation and is_cancelled(request.request):
                if self.stop_core_on_cancel:
                    self._stop_core(core_id)
                stopped = True
                continue
            if core_response.has_error():
                raise RequestError(core_response.error().message())
            output_ids = pb_utils.get_output_tensor_by_name(core_response, "output_ids")
            if output_ids is None:  # the empty final response of a decoupled stream
                continue
            tokens = output_ids.as_numpy()
            lengths = _output(core_response, "sequence_length")
            if streaming and self.accumulate_tokens:
                accumulated = tokens if accumulated is None else np.concatenate([accumulated, tokens], axis=-1)
                tokens = accumulated
                lengths = np.array([[accumulated.shape[-1]]], dtype=np.int32)
            outputs = [pb_utils.Tensor("text_output", self._postprocess(tokens, lengths))]
            for name in _PASSTHROUGH_OUTPUTS:
                tensor = pb_utils.get_output_tensor_by_name(core_response, name)
                if tensor is not None:
                    outputs.append(pb_utils.Tensor(name, tensor.as_numpy()))
            yield pb_utils.InferenceResponse(output_tensors=outputs)

    def _preprocess(self, request: RequestInputs) -> dict[str, np.ndarray]:
        inputs = []
        for name, pre_name in _PREPROCESSING_INPUTS.items():
            value = request.get(name)
            if value is not None:
                inputs.append(pb_utils.Tensor(pre_name, _as_batch(value)))
        response = pb_utils.InferenceRequest(
            model_name=self.preprocessing_model, inputs=inputs,
            requested_output_names=list(_PREPROCESSED)).exec()
        if response.has_error():
            raise RequestError(response.error().message())
        return {name: _output(response, name) for name in _PREPROCESSED}

    def _postprocess(self, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        response = pb_utils.InferenceRequest(
            model_name=self.postprocessing_model, requested_output_names=["OUTPUT"],
            inputs=[pb_utils.Tensor("TOKENS_BATCH", tokens.astype(np.int32)),
                    pb_utils.Tensor("SEQUENCE_LENGTH", lengths.astype(np.int32))]).exec()
        if response.has_error():
            raise RequestError(response.error().message())
        return _output(response, "OUTPUT")

    def finalize(self) -> None:
        with self._threads_lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout=5)
