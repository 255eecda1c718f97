"""What a caller hands the engine and what it gets back: plain data, no torch, so that a process which only
talks to the engine (the Triton python model in front of `EngineProcess`) never loads torch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingConfig:
    """Per-request generation settings (names follow TensorRT-LLM's executor / Triton inputs)."""

    max_new_tokens: int = 16
    end_id: int | None = None
    pad_id: int | None = None
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0
    bad_words: list[list[int]] = field(default_factory=list)
    stop_words: list[list[int]] = field(default_factory=list)
    return_log_probs: bool = False
    beam_width: int = 1

    @property
    def is_greedy(self) -> bool:
        return self.top_k <= 1 and self.top_p <= 0.0

    @property
    def needs_processing(self) -> bool:
        """True when the logits must be edited row by row before the argmax / draw (min_tokens is not: it is
        applied to all rows at once by `mask_min_tokens`)."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or bool(self.bad_words))



@dataclass(frozen=True)
class GenerationRequest:
    """One prompt to complete. `streaming`: a result per step instead of one at the end."""

    input_ids: list[int]
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    streaming: bool = False


@dataclass(frozen=True)
class GenerationResult:
    """New token ids (streaming) or all generated ids (non-streaming); `finished` is True exactly once."""

    request_id: int
    token_ids: list[int]
    finished: bool
    finish_reason: str | None = None  # "length" | "end_id" | "stop_words" | "cancelled" | "error"
    log_probs: list[float] | None = None
    cum_log_prob: float | None = None
    error: str | None = None
    scheduled_ns: int = 0  # time.time_ns() when the request was first scheduled (its queue time ends there)


Callback = Callable[[GenerationResult], None]


@dataclass(frozen=True)
class RequestLimits:
    """What an engine can take: its build limits, its vocabulary and the tokens its KV pool holds."""

    max_input_len: int
    max_seq_len: int
    vocab_size: int
    kv_cache_tokens: int


def validate_request(request: GenerationRequest, limits: RequestLimits) -> None:
    """Raise ValueError, with a one-line reason, for a request the engine cannot take."""
    ids = request.input_ids
    sampling = request.sampling
    vocab = limits.vocab_size
    if len(ids) == 0:
        raise ValueError("the prompt is empty: give at least one input token")
    if len(ids) > limits.max_input_len:
        raise ValueError(f"the prompt has {len(ids)} tokens, more than the engine's max_input_len "
                         f"{limits.max_input_len}")
    if sampling.max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {sampling.max_new_tokens}")
    if len(ids) + sampling.max_new_tokens > limits.max_seq_len:
        raise ValueError(f"prompt ({len(ids)} tokens) + max_new_tokens ({sampling.max_new_tokens}) is more "
                         f"than the engine's max_seq_len {limits.max_seq_len}")
    if len(ids) + sampling.max_new_tokens > limits.kv_cache_tokens:
        raise ValueError(f"prompt ({len(ids)} tokens) + max_new_tokens ({sampling.max_new_tokens}) is more "
                         f"than the KV cache holds ({limits.kv_cache_tokens} tokens)")
    if sampling.beam_width != 1:
        raise ValueError(f"beam_width {sampling.beam_width} is not supported by the pytorch engine (only 1)")
    bad = [t for t in ids if not 0 <= int(t) < vocab]
    if bad:
        raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
    if sampling.end_id is not None and not 0 <= sampling.end_id < vocab:
        raise ValueError(f"end_id {sampling.end_id} is outside the vocabulary [0, {vocab})")
    if sampling.temperature < 0 or not 0.0 <= sampling.top_p <= 1.0 or sampling.top_k < 0:
        raise ValueError("temperature and top_k must be >= 0 and top_p within [0, 1]")
    for words in list(sampling.bad_words) + list(sampling.stop_words):
        if any(not 0 <= int(t) < vocab for t in words):
            raise ValueError(f"bad/stop word {words} has token ids outside the vocabulary")
