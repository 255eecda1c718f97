"""`gen-repo run`: generate from an engine dir without Triton, on one rank or under `mpirun -n N`.

Rank 0 owns the `Executor` and prints; ranks > 0 follow it (`generator.engine.follow`). When mpirun gives no
MASTER_ADDR / MASTER_PORT, rank 0 picks a free port and shares it over MPI (`generator.engine.ranks`).
Under mpirun: `mpirun -n N python -m generator run ...` (or `mpirun -n N gen-repo run ...`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from generator.errors import GenRepoError

if TYPE_CHECKING:
    pass


@dataclass(frozen=True)
class RunSettings:
    """One or more prompts (text, or token ids) to complete with an engine dir."""

    engine_dir: Path
    prompts: list[str] = field(default_factory=list)
    input_ids: list[list[int]] = field(default_factory=list)
    tokenizer_dir: Path | None = None
    max_new_tokens: int = 32
    end_id: int | None = None
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0
    seed: int | None = None
    as_json: bool = False
    device: str | None = None


def _load_tokenizer(path: Path) -> Any:
    try:
        from generator.formats.tokenizer import load_tokenizer
    except ImportError:  # tokenizer module missing: plain transformers
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path))
    return load_tokenizer(path)


def run(settings: RunSettings) -> list[dict[str, Any]] | None:
    """Generate on rank 0 (returns one dict per prompt: output_ids, text, finish_reason); ranks > 0 follow
    rank 0 and return None."""
    from generator.engine import Executor, GenerationRequest, SamplingConfig
    from generator.engine.ranks import join_engine_ranks

    if join_engine_ranks(settings.engine_dir, settings.device, "run") is None:
        return None
    tokenizer = _load_tokenizer(settings.tokenizer_dir) if settings.tokenizer_dir else None
    requests = [list(ids) for ids in settings.input_ids]
    if settings.prompts:
        if tokenizer is None:
            raise GenRepoError("text prompts need --tokenizer-dir (or pass --input-ids)")
        requests += [tokenizer.encode(text) for text in settings.prompts]
    if not requests:
        raise GenRepoError("nothing to generate: give a prompt or --input-ids")
    end_id = settings.end_id
    if end_id is None and tokenizer is not None:
        end_id = getattr(tokenizer, "eos_token_id", None)
    sampling = SamplingConfig(max_new_tokens=settings.max_new_tokens, end_id=end_id,
                              temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
                              seed=settings.seed)
    import threading

    outputs: list[dict[str, Any]] = []
    with Executor(settings.engine_dir, device=settings.device) as executor:
        events = [threading.Event() for _ in requests]
        finals: list[Any] = [None] * len(requests)
        for index, ids in enumerate(requests):
            def on_result(result: Any, index: int = index) -> None:
                finals[index] = result
                events[index].set()
            try:
                executor.enqueue(GenerationRequest(ids, sampling), on_result)
            except ValueError as error:
                raise GenRepoError(str(error)) from error
        for event in events:
            event.wait()
    for ids, result in zip(requests, finals, strict=True):
        text = tokenizer.decode(result.token_ids) if tokenizer is not None else None
        outputs.append({"input_ids": ids, "output_ids": result.token_ids, "text": text,
                        "finish_reason": result.finish_reason, "error": result.error})
    return outputs


def print_outputs(outputs: list[dict[str, Any]], as_json: bool) -> None:
    """Text (or the ids when there is no tokenizer), one prompt per line; JSON lines with `as_json`."""
    for output in outputs:
        if as_json:
            print(json.dumps(output), flush=True)
        elif output["text"] is not None:
            print(output["text"], flush=True)
        else:
            print(" ".join(str(t) for t in output["output_ids"]), flush=True)
