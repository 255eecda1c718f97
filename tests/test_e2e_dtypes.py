"""bfloat16 and float16 conversions of tiny-mpt load and serve, and Triton answers what the engine computes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from generator.serving.client import InferSettings, generate
from generator.serving.serve import stop_server
from tests.conftest import run_tiny_job, start_test_server

PROMPT = "What is machine learning?"
NEW_TOKENS = 8

pytestmark = pytest.mark.server


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_job_serves_the_engines_greedy_tokens(dtype: str, tmp_path: Path) -> None:
    from generator.engine import run_prompts
    from generator.engine.sampling import SamplingConfig
    from generator.formats.tokenizer import load_tokenizer

    job = run_tiny_job("tiny-mpt", tmp_path / "job", dtype=dtype)
    assert json.loads((job.checkpoint_dir / "config.json").read_text())["dtype"] == dtype
    tokenizer = load_tokenizer(job.tokenizer_dir)
    prompt_ids = tokenizer.encode(PROMPT)
    [expected] = run_prompts(job.engine_dir, [prompt_ids],
                             SamplingConfig(max_new_tokens=NEW_TOKENS, end_id=tokenizer.eos_token_id))
    server, process = start_test_server(job, tmp_path / "tritonserver.log")
    try:
        for protocol, url in (("grpc", server.grpc_url), ("http", server.http_url)):
            answer = generate(InferSettings(prompt=PROMPT, url=url, protocol=protocol, max_tokens=NEW_TOKENS,
                                            exclude_input_in_output=True, timeout_s=120))
            assert answer.text == tokenizer.decode(list(expected.token_ids))
            assert answer.text
    finally:
        stop_server(process, shm_prefix=server.shm_prefix)
