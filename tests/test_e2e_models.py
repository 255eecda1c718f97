"""More layouts through a real tritonserver: tiny-dbrx (MoE, tiktoken tokenizer) and tiny-mpt at TP 2 (mpirun)."""

from __future__ import annotations

from pathlib import Path

import pytest

from generator.formats.tokenizer import load_tokenizer
from generator.serving.client import InferSettings, generate
from generator.serving.serve import remove_shared_memory, repository_world_size, stop_server
from tests.conftest import run_tiny_job, start_test_server
from tests.factories import hf_greedy

PROMPTS = ["What is machine learning?", "def generate(model"]
NEW_TOKENS = 10

pytestmark = pytest.mark.server


def _check_served_parity(job_dir: Path, model: str, tmp_path: Path, remove_leftovers: bool = True,
                         **overrides: object) -> str:
    """Serve the tiny job, compare answers with transformers; returns the server's shm prefix."""
    job = run_tiny_job(model, job_dir, **overrides)
    tokenizer = load_tokenizer(job.tokenizer_dir)
    expected = {prompt: tokenizer.decode(hf_greedy(job.hf_dir, [tokenizer.encode(prompt)], NEW_TOKENS)[0])
                for prompt in PROMPTS}
    server, process = start_test_server(job, tmp_path / "tritonserver.log")
    try:
        for prompt in PROMPTS:
            for protocol, url in (("grpc", server.grpc_url), ("http", server.http_url)):
                answer = generate(InferSettings(prompt=prompt, url=url, protocol=protocol, max_tokens=NEW_TOKENS,
                                                exclude_input_in_output=True, timeout_s=120))
                assert answer.text == expected[prompt], (prompt, protocol)
    finally:
        stop_server(process, shm_prefix=server.shm_prefix if remove_leftovers else "")
    return server.shm_prefix


def test_tiny_dbrx_served_text_equals_transformers_greedy(tmp_path: Path) -> None:
    _check_served_parity(tmp_path / "job", "tiny-dbrx", tmp_path)


@pytest.mark.mpi
def test_tiny_mpt_tp2_served_under_mpirun_equals_transformers_greedy(tmp_path: Path) -> None:
    shm_prefix = _check_served_parity(tmp_path / "job", "tiny-mpt", tmp_path, remove_leftovers=False,
                                      tensor_parallel_size=2)
    assert repository_world_size(tmp_path / "job" / "triton_repo") == 2
    # rank 0 shut down cleanly (SIGTERM to it first, not to mpirun): its stubs removed their regions
    leftover = sorted(Path("/dev/shm").glob(f"{shm_prefix}prefix0_*"))
    remove_shared_memory(shm_prefix)
    assert not leftover
