"""Presets: real dimensions give the published sizes; unknown names and missing checkpoints fail clearly."""

from __future__ import annotations

from pathlib import Path

import pytest

from generator.errors import GenRepoError
from generator.presets import PRESETS, get_preset, models_table, resolve_checkpoint


@pytest.mark.parametrize(("name", "billions"), [
    ("mpt-7b", 6.65), ("mpt-30b", 29.96), ("replit-code-v1.5-3b", 3.32), ("dbrx-base", 131.60),
    ("dbrx-instruct", 131.60),
])
def test_parameter_counts_match_the_published_model_sizes(name: str, billions: float) -> None:
    assert get_preset(name).parameter_count() / 1e9 == pytest.approx(billions, abs=0.01)


def test_real_dimensions_and_build_defaults() -> None:
    mpt = get_preset("mpt-7b")
    assert (mpt.hidden_size, mpt.num_attention_heads, mpt.num_hidden_layers, mpt.vocab_size) == (4096, 32, 32, 50432)
    assert (mpt.max_batch_size, mpt.max_input_len, mpt.max_seq_len) == (32, 1024, 1536)
    replit = get_preset("replit-code-v1.5-3b")
    assert (replit.num_attention_heads, replit.num_key_value_heads, replit.vocab_size) == (24, 8, 32768)
    dbrx = get_preset("dbrx-instruct")
    assert (dbrx.num_experts, dbrx.experts_per_token, dbrx.intermediate_size, dbrx.clip_qkv) == (16, 4, 10752, 8.0)
    assert dbrx.rope_theta == 500000.0 and dbrx.max_position_embeddings == 32768


def test_fitting_layouts_on_80_gib_gpus() -> None:
    dbrx = get_preset("dbrx-base")
    assert dbrx.fitting_layouts("bfloat16") == [4, 8]      # 245 GiB of bf16 weights
    assert dbrx.fitting_layouts("int4_wo") == [1, 2, 4, 8]
    assert get_preset("mpt-30b").fitting_layouts("float32") == [2, 4, 8]
    assert get_preset("mpt-7b").fitting_layouts("float16", gpu_memory_gib=8) == [2, 4, 8]


def test_unknown_preset_lists_the_known_ones() -> None:
    with pytest.raises(GenRepoError) as error:
        get_preset("mpt-8b")
    assert all(name in str(error.value) for name in PRESETS)


def test_real_preset_without_checkpoint_offline_says_how_to_pass_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(GenRepoError, match="--model-dir"):
        resolve_checkpoint(get_preset("mpt-7b"))


def test_real_preset_with_a_dir_lacking_config_fails(tmp_path: Path) -> None:
    with pytest.raises(GenRepoError, match="config.json"):
        resolve_checkpoint(get_preset("mpt-7b"), tmp_path)


def test_models_table_lists_every_preset() -> None:
    table = models_table()
    for name in PRESETS:
        assert name in table
    assert "131.60B" in table and "6.65B" in table


def test_real_preset_with_a_checkpoint_of_another_architecture_fails(tmp_path: Path) -> None:
    from generator.tiny import make_tiny_model

    mpt_dir = make_tiny_model("tiny-mpt", tmp_path / "mpt")
    assert resolve_checkpoint(get_preset("mpt-7b"), mpt_dir) == mpt_dir
    with pytest.raises(GenRepoError, match="'mpt' checkpoint"):
        resolve_checkpoint(get_preset("dbrx-instruct"), mpt_dir)
