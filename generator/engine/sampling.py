"""Sampling with TensorRT-LLM's semantics: greedy unless top_k > 1 or top_p > 0.

Order: min_tokens (end_id masked, all rows at once), then per row repetition penalty (multiplicative, HF
style, over prompt + output), presence / frequency penalties (additive, over prompt + output), bad words, then
greedy argmax or
temperature -> top-k -> top-p -> a draw from the request's own `torch.Generator`. The returned log
probability is the log-softmax of the processed logits at the chosen token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from generator.engine.requests import SamplingConfig


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


def _process_row(logits: torch.Tensor, state: SequenceState) -> None:
    """Penalties, min_tokens and bad words, applied in place to one row of logits."""
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
    for words in config.bad_words:
        if not words:
            continue
        prefix = words[:-1]
        if not prefix or (len(sequence) >= len(prefix) and sequence[-len(prefix):] == prefix):
            logits[words[-1]] = float("-inf")


def mask_min_tokens(logits: torch.Tensor, states: list[SequenceState]) -> torch.Tensor:
    """`logits` with end_id masked in the rows that have not reached their min_tokens (one indexing op; a copy
    only when some row needs it)."""
    rows = [(row, s.config.end_id) for row, s in enumerate(states)
            if s.config.end_id is not None and len(s.output) < s.config.min_tokens]
    if not rows:
        return logits
    logits = logits.clone()
    index = torch.tensor(rows, dtype=torch.long).to(logits.device, non_blocking=True)
    # the value as a device tensor: `logits[i, j] = float("-inf")` copies the scalar to the GPU with a blocking
    # copy, which waited for the forward in flight and cost the step loop its lookahead (served ITL +18%)
    ninf = torch.full((len(rows),), float("-inf"), dtype=logits.dtype, device=logits.device)
    logits.index_put_((index[:, 0], index[:, 1]), ninf)
    return logits


def _draw(logits: torch.Tensor, states: list[SequenceState]) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperature -> top-k -> top-p -> one draw per row, for all rows at once.

    Each row's uniform number comes from its own generator; the token is found by inverse CDF over the
    sorted, filtered distribution. Returns the tokens and the filtered log-softmax at them.
    """
    rows, vocab = logits.shape
    device = logits.device
    configs = [s.config for s in states]
    temperature = torch.tensor([max(c.temperature, 1e-5) for c in configs], device=device)
    top_k = torch.tensor([c.top_k if 0 < c.top_k < vocab else vocab for c in configs], device=device)
    top_p = torch.tensor([c.top_p if 0.0 < c.top_p < 1.0 else 2.0 for c in configs], device=device)
    sorted_logits, order = torch.sort(logits / temperature[:, None], dim=-1, descending=True)
    beyond_k = torch.arange(vocab, device=device)[None, :] >= top_k[:, None]
    sorted_logits = sorted_logits.masked_fill(beyond_k, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    # drop a token when the tokens before it already reach top_p (the first token always stays)
    beyond_p = (probs.cumsum(dim=-1) - probs) >= top_p[:, None]
    sorted_logits = sorted_logits.masked_fill(beyond_p, float("-inf"))
    log_probs = torch.log_softmax(sorted_logits, dim=-1)
    cdf = log_probs.exp().cumsum(dim=-1)
    uniform = torch.stack([torch.rand((), generator=s.generator, device=device) if s.generator is not None
                           else torch.zeros((), device=device) for s in states])
    choice = torch.searchsorted(cdf, uniform[:, None], right=True).clamp_(max=vocab - 1)
    return order.gather(1, choice)[:, 0], log_probs.gather(1, choice)[:, 0]


def sample(logits: torch.Tensor, states: list[SequenceState]) -> tuple[list[int], list[float | None]]:
    """Pick one token per row of `logits` ([B, vocab], float32); returns the tokens and their log probs.

    One host sync per call, whatever the mix of greedy and sampled rows.
    """
    want_log_probs = any(s.config.return_log_probs for s in states)
    logits = mask_min_tokens(logits, states)
    if all(s.config.is_greedy and not s.config.needs_processing for s in states) and not want_log_probs:
        return logits.argmax(dim=-1).tolist(), [None] * len(states)
    logits = logits.clone()
    for row, state in enumerate(states):
        if state.config.needs_processing:
            _process_row(logits[row], state)  # edits the row in place
    greedy = torch.tensor([s.config.is_greedy for s in states], device=logits.device)
    tokens = logits.argmax(dim=-1)
    log_probs = torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None])[:, 0]
    if not all(s.config.is_greedy for s in states):
        drawn, drawn_log_probs = _draw(logits, states)
        tokens = torch.where(greedy, tokens, drawn)
        log_probs = torch.where(greedy, log_probs, drawn_log_probs)
    token_list = tokens.tolist()
    log_prob_list = log_probs.tolist() if want_log_probs else [None] * len(states)
    return token_list, [lp if s.config.return_log_probs else None
                        for lp, s in zip(log_prob_list, states, strict=True)]
