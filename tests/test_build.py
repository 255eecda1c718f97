"""`gen-repo build`: the pytorch engine dir layout, limit checks, and the CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from generator.build import BuildSettings, build_engine
from generator.cli import main
from generator.convert.job import ConvertSettings, convert_checkpoint
from generator.engine import load_engine_config
from generator.errors import ConfigError, GenRepoError
from tests.factories import make_mpt


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("build")
    hf_dir = make_mpt(root / "hf", max_seq_len=128)
    return convert_checkpoint(ConvertSettings(hf_dir, root / "checkpoint", dtype="float32", tensor_parallel_size=2,
                                              progress=False))


def test_pytorch_engine_dir_layout(checkpoint: Path, tmp_path: Path) -> None:
    engine = build_engine(BuildSettings(checkpoint, tmp_path / "engine", max_batch_size=3, max_input_len=20,
                                        max_seq_len=100))
    config = json.loads((engine / "config.json").read_text())
    assert config["engine_backend"] == "pytorch" and config["version"].startswith("gen-repo ")
    assert config["pretrained_config"] == json.loads((checkpoint / "config.json").read_text())
    build = config["build_config"]
    assert (build["max_batch_size"], build["max_input_len"], build["max_seq_len"], build["max_beam_width"]) == (
        3, 20, 100, 1)
    assert build["max_num_tokens"] == 60 and build["kv_cache_type"] == "PAGED"
    assert build["plugin_config"]["gpt_attention_plugin"] == "float32"
    for rank in range(2):
        linked, original = engine / f"rank{rank}.safetensors", checkpoint / f"rank{rank}.safetensors"
        assert os.stat(linked).st_ino == os.stat(original).st_ino
    limits = load_engine_config(engine)
    assert (limits.max_batch_size, limits.max_input_len, limits.max_seq_len, limits.max_num_tokens) == (3, 20, 100, 60)


def test_rebuild_replaces_stale_rank_files(checkpoint: Path, tmp_path: Path) -> None:
    engine = tmp_path / "engine"
    engine.mkdir()
    (engine / "rank7.safetensors").write_text("stale")
    build_engine(BuildSettings(checkpoint, engine, max_input_len=20))
    assert sorted(p.name for p in engine.iterdir()) == ["config.json", "rank0.safetensors", "rank1.safetensors"]
    assert json.loads((engine / "config.json").read_text())["build_config"]["max_seq_len"] == 128


@pytest.mark.parametrize(("overrides", "message"), [
    ({"max_seq_len": 129}, "max_position_embeddings"),
    ({"max_input_len": 64, "max_seq_len": 64}, "max_input_len"),
    ({"max_input_len": 64, "max_num_tokens": 32}, "max_num_tokens"),
    ({"max_beam_width": 2}, "beam"),
    ({"engine_backend": "onnx"}, "onnx"),
    ({"max_batch_size": 0}, "max_batch_size"),
])
def test_bad_limits_are_clear_errors(checkpoint: Path, tmp_path: Path, overrides: dict[str, object],
                                     message: str) -> None:
    settings = {"max_input_len": 20, **overrides}
    with pytest.raises(ConfigError, match=message):
        build_engine(BuildSettings(checkpoint, tmp_path / "engine", **settings))  # type: ignore[arg-type]
    assert not (tmp_path / "engine").exists()


def test_missing_rank_file_is_reported(checkpoint: Path, tmp_path: Path) -> None:
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((checkpoint / "config.json").read_text())
    os.link(checkpoint / "rank0.safetensors", partial / "rank0.safetensors")
    with pytest.raises(GenRepoError, match="rank1.safetensors"):
        build_engine(BuildSettings(partial, tmp_path / "engine", max_input_len=20))


def test_dry_run_writes_nothing(checkpoint: Path, tmp_path: Path) -> None:
    build_engine(BuildSettings(checkpoint, tmp_path / "engine", max_input_len=20, dry_run=True))
    assert not (tmp_path / "engine").exists()


def test_cli_build(checkpoint: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(main, ["build", "--checkpoint-dir", str(checkpoint), "--output", str(tmp_path / "engine"),
                              "--max-batch-size", "2", "--max-input-len", "16", "--max-seq-len", "48"])
    assert ok.exit_code == 0, ok.output
    assert json.loads((tmp_path / "engine" / "config.json").read_text())["build_config"]["max_seq_len"] == 48
    bad = runner.invoke(main, ["build", "--checkpoint-dir", str(checkpoint), "--output", str(tmp_path / "other"),
                               "--max-input-len", "16", "--max-seq-len", "4096"])
    assert bad.exit_code == 2 and "max_position_embeddings" in bad.output


def test_cli_build_defaults_fit_a_short_checkpoint(tmp_path: Path) -> None:
    """`gen-repo build --checkpoint-dir C --output E` and nothing else, on a checkpoint of 256 positions: the
    defaults come from the checkpoint (max_seq_len 256, max_input_len 128), as the whole job derives them."""
    hf_dir = make_mpt(tmp_path / "hf", max_seq_len=256)
    checkpoint = convert_checkpoint(ConvertSettings(hf_dir, tmp_path / "checkpoint", progress=False))
    for backend in ("pytorch", "tensorrtllm"):
        result = CliRunner().invoke(main, ["build", "--checkpoint-dir", str(checkpoint), "--output",
                                           str(tmp_path / backend), "--engine", backend, "--dry-run"])
        assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["build", "--checkpoint-dir", str(checkpoint), "--output",
                                       str(tmp_path / "engine")])
    assert result.exit_code == 0, result.output
    build = json.loads((tmp_path / "engine" / "config.json").read_text())["build_config"]
    assert (build["max_batch_size"], build["max_input_len"], build["max_seq_len"], build["max_num_tokens"]) == (
        8, 128, 256, 1024)
    # a given --max-seq-len still gets a prompt limit that fits it
    result = CliRunner().invoke(main, ["build", "--checkpoint-dir", str(checkpoint), "--output",
                                       str(tmp_path / "short"), "--max-seq-len", "40"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "short" / "config.json").read_text())["build_config"]["max_input_len"] == 20


@pytest.mark.parametrize("flag", ["--max-batch-size", "--max-input-len", "--max-seq-len", "--max-num-tokens"])
def test_cli_build_zero_is_an_error_not_the_default(checkpoint: Path, tmp_path: Path, flag: str) -> None:
    result = CliRunner().invoke(main, ["build", "--checkpoint-dir", str(checkpoint), "--output",
                                       str(tmp_path / "engine"), flag, "0"])
    assert result.exit_code == 2, result.output
    assert f"{flag.removeprefix('--').replace('-', '_')} must be at least 1, got 0" in result.output
    assert not (tmp_path / "engine").exists()


def test_build_refuses_a_convert_staging_dir(checkpoint: Path, tmp_path: Path) -> None:
    """The hidden `.NAME.tmp-*` dir a killed convert leaves is no checkpoint (it may be half written)."""
    import shutil

    staging = tmp_path / ".checkpoint.tmp-k3x9q1"
    shutil.copytree(checkpoint, staging)
    for backend in ("pytorch", "tensorrtllm"):
        result = CliRunner().invoke(main, ["build", "--checkpoint-dir", str(staging), "--output",
                                           str(tmp_path / "engine"), "--engine", backend, "--dry-run"])
        assert result.exit_code == 2 and "staging dir of an unfinished `gen-repo convert`" in result.output
    assert not (tmp_path / "engine").exists()


def test_truncated_rank_file_is_refused_by_build(checkpoint: Path, tmp_path: Path) -> None:
    """A rank file cut short (a copy interrupted, a full disk) fails at build with the cause, not at serve."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    data = (broken / "rank1.safetensors").read_bytes()
    (broken / "rank1.safetensors").write_bytes(data[: len(data) // 2])
    code_output = CliRunner().invoke(main, ["build", "--checkpoint-dir", str(broken), "--output",
                                            str(tmp_path / "engine")])
    assert code_output.exit_code == 2
    assert "rank1.safetensors is truncated" in code_output.output
    assert not (tmp_path / "engine").exists()
