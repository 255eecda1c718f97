"""validate: rendered repositories pass; each seeded defect is reported with the right file and field."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from generator.cli import main
from generator.pipeline import PipelineResult
from generator.serving.validate import Problem, validate_repository
from tests.test_render import make_engine_dir, make_tokenizer_dir, render


def edit(repo: Path, model: str, old: str, new: str) -> None:
    """Replace `old` (which must occur) by `new` in a model's config.pbtxt."""
    config = repo / model / "config.pbtxt"
    text = config.read_text()
    assert old in text, f"{old!r} not in {config}"
    config.write_text(text.replace(old, new, 1))


def engine_dir_of(repo: Path) -> Path:
    return repo.parent / f"{repo.name}_engine"


# (defect id, engine backend, how to seed it, file, field substring)
DEFECTS: list[tuple[str, str, Callable[[Path], None], str, str]] = [
    ("unfilled placeholder", "pytorch",
     lambda r: edit(r, "preprocessing", "max_batch_size: 8", "max_batch_size: ${triton_max_batch_size}"),
     "preprocessing/config.pbtxt", "max_batch_size"),
    ("unfilled parameter placeholder", "tensorrtllm",
     lambda r: edit(r, "tensorrt_llm", 'string_value: "guaranteed_no_evict"', 'string_value: "${batch_scheduler_policy}"'),
     "tensorrt_llm/config.pbtxt", "parameters[batch_scheduler_policy]"),
    ("syntax error", "pytorch",
     lambda r: edit(r, "postprocessing", "max_batch_size:", "max_batch_sise:"),
     "postprocessing/config.pbtxt", "(syntax)"),
    ("input_map key the step lacks", "pytorch",
     lambda r: edit(r, "ensemble", 'key: "runtime_top_k"', 'key: "top_k_runtime"'),
     "ensemble/config.pbtxt", "step[1].input_map[top_k_runtime]"),
    ("input_map value nobody provides", "pytorch",
     lambda r: edit(r, "ensemble", 'value: "_REQUEST_INPUT_LEN" }\n      input_map { key: "decoder_input_lengths"',
                    'value: "_REQUEST_INPUT_LENGTH" }\n      input_map { key: "decoder_input_lengths"'),
     "ensemble/config.pbtxt", "step[1].input_map[input_lengths]"),
    ("output_map key the step lacks", "pytorch",
     lambda r: edit(r, "ensemble", 'output_map { key: "OUTPUT"', 'output_map { key: "TEXT"'),
     "ensemble/config.pbtxt", "step[2].output_map[TEXT]"),
    ("ensemble output nobody produces", "pytorch",
     lambda r: edit(r, "ensemble", 'output_map { key: "cum_log_probs", value: "cum_log_probs" }', ""),
     "ensemble/config.pbtxt", "output[cum_log_probs]"),
    ("dtype mismatch across a map", "pytorch",
     lambda r: edit(r, "ensemble", '{ name: "top_k", data_type: TYPE_INT32', '{ name: "top_k", data_type: TYPE_FP32'),
     "ensemble/config.pbtxt", "step[1].input_map[runtime_top_k]"),
    ("contract dtype changed (BLS input no map checks)", "pytorch",
     lambda r: edit(r, "tensorrt_llm_bls", '{ name: "max_tokens", data_type: TYPE_INT32',
                    '{ name: "max_tokens", data_type: TYPE_INT64'),
     "tensorrt_llm_bls/config.pbtxt", "input[max_tokens]"),
    ("required contract input removed", "tensorrtllm",
     lambda r: edit(r, "tensorrt_llm", '  { name: "input_lengths", data_type: TYPE_INT32, dims: [ 1 ], '
                    'reshape: { shape: [ ] } },\n', ""),
     "tensorrt_llm/config.pbtxt", "input[input_lengths]"),
    ("step model missing", "pytorch",
     lambda r: shutil.rmtree(r / "postprocessing"),
     "ensemble/config.pbtxt", "step[2].model_name"),
    ("ensemble batch larger than a step's", "pytorch",
     lambda r: edit(r, "postprocessing", "max_batch_size: 8", "max_batch_size: 2"),
     "ensemble/config.pbtxt", "max_batch_size"),
    ("tensorrt_llm batch larger than the engine's", "pytorch",
     lambda r: edit(r, "tensorrt_llm", "max_batch_size: 8", "max_batch_size: 64"),
     "tensorrt_llm/config.pbtxt", "max_batch_size"),
    ("not decoupled", "pytorch",
     lambda r: edit(r, "tensorrt_llm", "decoupled: true", "decoupled: false"),
     "tensorrt_llm/config.pbtxt", "model_transaction_policy.decoupled"),
    ("tokenizer dir missing", "pytorch",
     lambda r: shutil.rmtree(r.parent / "tokenizer"),
     "preprocessing/config.pbtxt", "parameters[tokenizer_dir]"),
    ("engine rank file missing", "pytorch",
     lambda r: (engine_dir_of(r) / "rank0.safetensors").unlink(),
     "tensorrt_llm/config.pbtxt", "parameters[gpt_model_path]"),
    ("gpu_device_ids vs world size", "tensorrtllm",
     lambda r: edit(r, "tensorrt_llm", 'string_value: "0,1"', 'string_value: "0"'),
     "tensorrt_llm/config.pbtxt", "parameters[gpu_device_ids]"),
    ("backend vs engine", "pytorch",
     lambda r: edit(r, "tensorrt_llm", 'backend: "python"', 'backend: "tensorrtllm"'),
     "tensorrt_llm/config.pbtxt", "backend"),
    ("several tensorrt_llm instances", "pytorch",
     lambda r: edit(r, "tensorrt_llm", "instance_group [ { count: 1,", "instance_group [ { count: 2,"),
     "tensorrt_llm/config.pbtxt", "instance_group"),
    ("model.py missing", "pytorch",
     lambda r: (r / "preprocessing" / "1" / "model.py").unlink(),
     "preprocessing/1/model.py", "(file)"),
    ("KV cache smaller than one sequence", "tensorrtllm",
     lambda r: edit(r, "tensorrt_llm", '"max_tokens_in_paged_kv_cache", value: { string_value: ""',
                    '"max_tokens_in_paged_kv_cache", value: { string_value: "64"'),
     "tensorrt_llm/config.pbtxt", "parameters[max_tokens_in_paged_kv_cache]"),
    ("KV cache memory fraction", "tensorrtllm",
     lambda r: edit(r, "tensorrt_llm", 'string_value: "0.9"', 'string_value: "1.5"'),
     "tensorrt_llm/config.pbtxt", "parameters[kv_cache_free_gpu_mem_fraction]"),
    ("invalid batching strategy", "tensorrtllm",
     lambda r: edit(r, "tensorrt_llm", 'string_value: "inflight_fused_batching"', 'string_value: "static"'),
     "tensorrt_llm/config.pbtxt", "parameters[gpt_model_type]"),
]


@pytest.mark.parametrize("engine_backend", ["pytorch", "tensorrtllm"])
def test_rendered_repositories_pass(tmp_path: Path, engine_backend: str) -> None:
    repo = render(tmp_path, engine_backend=engine_backend, world_size=2 if engine_backend == "tensorrtllm" else 1)
    assert validate_repository(repo) == []


@pytest.mark.parametrize("defect", DEFECTS, ids=[d[0] for d in DEFECTS])
def test_seeded_defect_is_caught(tmp_path: Path, defect: tuple[str, str, Callable[[Path], None], str, str]) -> None:
    _, engine_backend, seed, file, field = defect
    repo = render(tmp_path, engine_backend=engine_backend, world_size=2 if engine_backend == "tensorrtllm" else 1)
    assert validate_repository(repo) == []
    seed(repo)
    problems = validate_repository(repo)
    assert any(p.file == file and field in p.field for p in problems), "\n".join(map(str, problems))


def test_duplicated_ensemble_output_is_reported(tmp_path: Path) -> None:
    # the anchor's own ensemble at c2e65b8 declares kv_cache_alloc_total_blocks twice
    repo = render(tmp_path)
    line = '  { name: "kv_cache_alloc_total_blocks", data_type: TYPE_INT32, dims: [ 1 ] },\n'
    edit(repo, "ensemble", line, line + line)
    problems = validate_repository(repo)
    assert Problem("ensemble/config.pbtxt", "output[kv_cache_alloc_total_blocks]", "declared twice") in problems


def test_cli_validate_reports_file_and_field(tmp_path: Path) -> None:
    repo = render(tmp_path)
    edit(repo, "tensorrt_llm", "max_batch_size: 8", "max_batch_size: 64")
    result = CliRunner().invoke(main, ["validate", str(repo)])
    assert result.exit_code == 1
    assert "tensorrt_llm/config.pbtxt: max_batch_size: 64 exceeds the engine's max_batch_size 8" in result.output


def test_not_a_repository(tmp_path: Path) -> None:
    assert [p.field for p in validate_repository(tmp_path / "missing")] == ["(dir)"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "not a Triton model repository" in validate_repository(empty)[0].message


def test_engine_world_size_needs_every_rank_file(tmp_path: Path) -> None:
    engine = make_engine_dir(tmp_path / "repo_engine", "tensorrtllm", world_size=2)
    make_tokenizer_dir(tmp_path / "tokenizer")
    repo = render(tmp_path, engine_backend="tensorrtllm", world_size=2)
    (engine / "rank1.engine").unlink()
    messages = [p.message for p in validate_repository(repo)]
    assert any("rank1.engine is missing" in m for m in messages), messages


# Defects in the files the models load (issue 10 item 7): validate(deep=True), as `gen-repo validate` runs it, on a
# copy of the real tiny-mpt job.
@pytest.fixture(scope="module")
def other_model_engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The engine of another model (tiny DBRX)."""
    from tests.conftest import run_tiny_job

    return run_tiny_job("tiny-dbrx", tmp_path_factory.mktemp("dbrx-job")).engine_dir


def copy_job(job: PipelineResult, root: Path) -> Path:
    """Copy the job's engine, tokenizer and repository under `root`, the configs pointing at the copies."""
    for source, name in ((job.engine_dir, "engine"), (job.tokenizer_dir, "tokenizer"), (job.triton_repo, "repo")):
        shutil.copytree(source, root / name)
    for config in (root / "repo").glob("*/config.pbtxt"):
        text = config.read_text().replace(str(job.engine_dir), str(root / "engine"))
        config.write_text(text.replace(str(job.tokenizer_dir), str(root / "tokenizer")))
    return root / "repo"


def _truncate(path: Path) -> None:
    with open(path, "r+b") as file:
        file.truncate(path.stat().st_size // 2)


def _bigger_tokenizer(path: Path) -> None:
    tokenizer = json.loads(path.read_text())
    tokenizer["added_tokens"].append({"id": 1500, "content": "<|extra|>", "single_word": False, "lstrip": False,
                                      "rstrip": False, "normalized": False, "special": True})
    path.write_text(json.dumps(tokenizer))


def _engine_vocab(path: Path, vocab_size: int) -> None:
    config = json.loads(path.read_text())
    config["pretrained_config"]["vocab_size"] = vocab_size
    path.write_text(json.dumps(config))


# (defect id, how to seed it given the copied repo, file, field substring, message substring)
FILE_DEFECTS: list[tuple[str, Callable[[Path], None], str, str, str]] = [
    ("truncated engine rank file", lambda r: _truncate(r.parent / "engine" / "rank0.safetensors"),
     "rank0.safetensors", "(file)", "truncated"),
    ("truncated tokenizer.json", lambda r: _truncate(r.parent / "tokenizer" / "tokenizer.json"),
     "tokenizer.json", "(json)", "truncated"),
    ("model.py syntax error", lambda r: (r / "preprocessing" / "1" / "model.py").write_text(
        (r / "preprocessing" / "1" / "model.py").read_text() + "\ndef broken(:\n"),
     "preprocessing/1/model.py", "(syntax)", "does not compile"),
    ("unknown backend", lambda r: edit(r, "postprocessing", 'backend: "python"', 'backend: "pyhton"'),
     "postprocessing/config.pbtxt", "backend", "unknown backend 'pyhton'"),
    ("instance count 0", lambda r: edit(r, "preprocessing", "instance_group [ { count: 1,", "instance_group [ { count: 0,"),
     "preprocessing/config.pbtxt", "instance_group[0].count", "is 0"),
    ("stray directory", lambda r: (r / "notes").mkdir(), "notes", "(dir)", "without config.pbtxt"),
    ("tokenizer vocab larger than the engine's", lambda r: _bigger_tokenizer(r.parent / "tokenizer" / "tokenizer.json"),
     "tokenizer.json", "(vocab)", "1501 token ids but the engine's vocab_size is 1000"),
    ("engine config vocab differs from its weights", lambda r: _engine_vocab(r.parent / "engine" / "config.json", 2000),
     "rank0.safetensors", "vocab_embedding", "1000 rows but config.json says vocab_size 2000"),
]


@pytest.mark.parametrize("defect", FILE_DEFECTS, ids=[d[0] for d in FILE_DEFECTS])
def test_defect_in_loaded_files_is_caught(tiny_mpt_job: PipelineResult, tmp_path: Path,
                                          defect: tuple[str, Callable[[Path], None], str, str, str]) -> None:
    _, seed, file, field, message = defect
    repo = copy_job(tiny_mpt_job, tmp_path)
    assert validate_repository(repo, deep=True) == []
    seed(repo)
    problems = validate_repository(repo, deep=True)
    assert any(p.file.endswith(file) and field in p.field and message in p.message for p in problems), (
        "\n".join(map(str, problems)))


def test_engine_of_another_model_is_caught(tiny_mpt_job: PipelineResult, other_model_engine: Path,
                                           tmp_path: Path) -> None:
    repo = copy_job(tiny_mpt_job, tmp_path)
    edit(repo, "tensorrt_llm", str(tmp_path / "engine"), str(other_model_engine))
    problems = validate_repository(repo, deep=True)
    assert any(p.field == "parameters[gpt_model_path]" and "the engine is of another model" in p.message
               for p in problems), "\n".join(map(str, problems))


def test_cli_validate_reads_the_engine_files(tiny_mpt_job: PipelineResult, tmp_path: Path) -> None:
    repo = copy_job(tiny_mpt_job, tmp_path)
    assert CliRunner().invoke(main, ["validate", str(repo)]).exit_code == 0
    _truncate(tmp_path / "engine" / "rank0.safetensors")
    result = CliRunner().invoke(main, ["validate", str(repo)])
    assert result.exit_code == 1 and "rank0.safetensors: (file): truncated or corrupt" in result.output
