"""The whole job without a server: tiny checkpoints, output layout, rendered configs, broken checkpoints."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from generator.cli import main
from generator.pipeline import PipelineResult
from generator.tiny import TINY_NAMES, make_tiny_model


def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.mark.parametrize("name", TINY_NAMES)
def test_tiny_models_are_deterministic_and_load(name: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from generator.formats.tokenizer import load_tokenizer

    first = make_tiny_model(name, tmp_path / "a")
    second = make_tiny_model(name, tmp_path / "b")
    assert _digest(first) == _digest(second)
    tokenizer = load_tokenizer(first)
    assert tokenizer.eos_token_id == 0 and tokenizer.pad_token_id == 1
    text = "What is machine learning? café 東京"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    model = AutoModelForCausalLM.from_pretrained(first)
    assert model.config.vocab_size == tokenizer.vocab_size


def test_tiny_mpt_and_tiny_dbrx_tokenize_alike(tmp_path: Path) -> None:
    """tiny-dbrx's tiktoken tokenizer is built from the same BPE ranks as tiny-mpt's HF tokenizer."""
    from generator.formats.tokenizer import load_tokenizer

    mpt = load_tokenizer(make_tiny_model("tiny-mpt", tmp_path / "mpt"))
    dbrx = load_tokenizer(make_tiny_model("tiny-dbrx", tmp_path / "dbrx"))
    text = "def generate(model, tokenizer, prompt, max_new_tokens=16):\n    return 42  # don't"
    assert mpt.encode(text) == dbrx.encode(text)


def test_whole_job_layout(tiny_mpt_job: PipelineResult) -> None:
    out = tiny_mpt_job.output_dir
    assert {p.name for p in out.iterdir()} >= {"hf", "checkpoint", "engine", "tokenizer", "triton_repo"}
    assert (out / "checkpoint" / "rank0.safetensors").is_file()
    engine_config = json.loads((out / "engine" / "config.json").read_text())
    assert engine_config["build_config"]["max_batch_size"] == 4
    assert engine_config["build_config"]["max_input_len"] == 64
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert not list((out / "tokenizer").glob("*.safetensors"))
    models = {p.name for p in (out / "triton_repo").iterdir() if p.is_dir()}
    assert models >= {"preprocessing", "tensorrt_llm", "postprocessing", "ensemble", "tensorrt_llm_bls"}
    # paths written into the configs are absolute
    text = (out / "triton_repo" / "tensorrt_llm" / "config.pbtxt").read_text()
    assert str(out / "engine") in text


def test_every_rendered_config_parses_as_a_model_config(tiny_mpt_job: PipelineResult) -> None:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    configs = sorted(tiny_mpt_job.triton_repo.glob("*/config.pbtxt"))
    assert len(configs) >= 5
    for path in configs:
        config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        assert config.name == path.parent.name
        assert config.max_batch_size == 4


def test_rerun_reuses_the_tiny_checkpoint(tiny_mpt_job: PipelineResult, tmp_path: Path) -> None:
    output = tmp_path / "job"
    shutil.copytree(tiny_mpt_job.hf_dir, output / "hf")
    before = (output / "hf" / "model.safetensors").stat().st_mtime_ns
    result = CliRunner().invoke(main, ["--model", "tiny-mpt", "--output", str(output)])
    assert result.exit_code == 0, result.output
    assert "reusing tiny-mpt" in result.output
    assert "gen-repo serve --model-repository" in result.output
    assert (output / "hf" / "model.safetensors").stat().st_mtime_ns == before
    assert _digest(output / "checkpoint") == _digest(tiny_mpt_job.checkpoint_dir)


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_broken_checkpoint_fails_cleanly(damage: str, tiny_mpt_job: PipelineResult, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_mpt_job.hf_dir, broken)
    weights = broken / "model.safetensors"
    if damage == "missing":
        weights.unlink()
    else:
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    output = tmp_path / "out"
    result = CliRunner().invoke(main, ["--model", str(broken), "--output", str(output)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "safetensors" in result.output or "weight" in result.output
    checkpoint = output / "checkpoint"
    assert not checkpoint.exists() or not any(checkpoint.iterdir())


def test_real_preset_defaults_fit_a_smaller_checkpoint(tiny_mpt_job: PipelineResult, tmp_path: Path) -> None:
    """`--model mpt-7b --model-dir DIR` takes mpt-7b's build defaults, clamped to the checkpoint's 256 positions."""
    from generator.pipeline import default_limits
    from generator.presets import get_preset

    output = tmp_path / "job"
    result = CliRunner().invoke(main, ["--model", "mpt-7b", "--model-dir", str(tiny_mpt_job.hf_dir),
                                       "--output", str(output)])
    assert result.exit_code == 0, result.output
    engine = json.loads((output / "engine" / "config.json").read_text())
    assert engine["pretrained_config"]["dtype"] == "float16"
    limits = engine["build_config"]
    assert (limits["max_batch_size"], limits["max_input_len"], limits["max_seq_len"]) == (32, 128, 256)
    assert not (output / "hf").exists()
    # with room to spare the preset's own limits stand
    real = tmp_path / "real"
    real.mkdir()
    (real / "config.json").write_text(json.dumps({"model_type": "mpt", "max_seq_len": 2048}))
    assert default_limits(get_preset("mpt-7b"), real) == {"max_batch_size": 32, "max_input_len": 1024,
                                                         "max_seq_len": 1536}
