"""Sampling with TensorRT-LLM's semantics: greedy unless top_k > 1 or top_p > 0.

Order per row: repetition penalty (multiplicative, HF style, over prompt + output), presence / frequency
penalties (additive, over prompt + output), min_tokens (end_id masked), bad words, then greedy argmax or
temperature -> top-k -> top-p -> a draw from the request's own `torch.Generator`. The returned log
probability is the log-softmax of the processed logits at the chosen token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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
        """True when the logits must be edited before the argmax / draw."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.min_tokens > 0 or bool(self.bad_words))


@dataclass
class SequenceState:
    """What sampling needs to know about one running request."""

    config: SamplingConfig
    prompt: list[int]
    output: list[int]
    generator: torch.Generator | None = None


def new_generator(config: SamplingConfig, device: torch.device) -> torch.Generator | None:
    """A per-request generator (seeded when the request gives a seed); None for greedy requests."""
    if config.is_greedy:
        return None
    generator = torch.Generator(device=device)
    if config.seed is not None:
        generator.manual_seed(int(config.seed))
    else:
        generator.seed()
    return generator


def _process_row(logits: torch.Tensor, state: SequenceState) -> torch.Tensor:
    config = state.config
    sequence = state.prompt + state.output
    if sequence and (config.repetition_penalty != 1.0 or config.presence_penalty or config.frequency_penalty):
        ids = torch.tensor(sequence, device=logits.device)
        unique, counts = torch.unique(ids, return_counts=True)
        if config.repetition_penalty != 1.0:
            values = logits[unique]
            logits[unique] = torch.where(values > 0, values / config.repetition_penalty,
                                         values * config.repetition_penalty)
        if config.presence_penalty or config.frequency_penalty:
            logits[unique] -= config.presence_penalty + config.frequency_penalty * counts.to(logits.dtype)
    if config.end_id is not None and len(state.output) < config.min_tokens:
        logits[config.end_id] = float("-inf")
    for words in config.bad_words:
        if not words:
            continue
        prefix = words[:-1]
        if not prefix or (len(sequence) >= len(prefix) and sequence[-len(prefix):] == prefix):
            logits[words[-1]] = float("-inf")
    return logits


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0 and top_k < logits.shape[-1]:
        threshold = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # drop a token when the tokens before it already reach top_p (the first token always stays)
        drop = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def sample(logits: torch.Tensor, states: list[SequenceState]) -> tuple[list[int], list[float | None]]:
    """Pick one token per row of `logits` ([B, vocab], float32); returns the tokens and their log probs."""
    want_log_probs = any(s.config.return_log_probs for s in states)
    if all(s.config.is_greedy and not s.config.needs_processing for s in states) and not want_log_probs:
        return logits.argmax(dim=-1).tolist(), [None] * len(states)
    tokens: list[int] = []
    log_probs: list[float | None] = []
    for row, state in enumerate(states):
        config = state.config
        values = logits[row].clone()
        if config.needs_processing:
            values = _process_row(values, state)
        if config.is_greedy:
            token = int(values.argmax())
        else:
            values = values / max(config.temperature, 1e-5)
            values = _filter_top_k_top_p(values, config.top_k, config.top_p)
            probs = torch.softmax(values, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=state.generator))
        tokens.append(token)
        log_probs.append(float(torch.log_softmax(values, dim=-1)[token]) if config.return_log_probs else None)
    return tokens, log_probs
