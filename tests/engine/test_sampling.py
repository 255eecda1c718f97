"""Sampling: min_tokens masks end_id for all rows at once, and only in the rows that still need it."""

from __future__ import annotations

import torch

from generator.engine.sampling import SamplingConfig, SequenceState, mask_min_tokens, sample


def _state(min_tokens: int, generated: int, end_id: int | None = 3, **kwargs: object) -> SequenceState:
    config = SamplingConfig(max_new_tokens=8, end_id=end_id, min_tokens=min_tokens, **kwargs)  # type: ignore[arg-type]
    return SequenceState(config=config, prompt=[1, 2], output=[5] * generated)


def test_min_tokens_masks_end_id_only_where_needed() -> None:
    logits = torch.zeros(4, 6)
    logits[:, 3] = 10.0  # end_id is every row's argmax
    states = [_state(2, 0), _state(2, 2), _state(0, 0), _state(5, 1, end_id=None)]
    masked = mask_min_tokens(logits, states)
    assert masked[0, 3] == float("-inf") and masked[1, 3] == 10.0 and masked[2, 3] == 10.0 and masked[3, 3] == 10.0
    assert logits[0, 3] == 10.0  # the input is not edited
    tokens, _ = sample(logits, states)
    assert tokens[0] != 3 and tokens[1:] == [3, 3, 3]


def test_min_tokens_with_penalties_and_log_probs_matches_per_row() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 16)
    logits[:, 7] = 5.0
    states = [_state(4, 1, end_id=7, repetition_penalty=1.3), _state(1, 1, end_id=7, presence_penalty=0.5),
              _state(3, 0, end_id=7, return_log_probs=True)]
    tokens, log_probs = sample(logits, states)
    assert tokens[0] != 7 and tokens[2] != 7 and tokens[1] == 7
    assert log_probs[2] is not None and log_probs[2] <= 0.0
