"""Every registered architecture, with no list to forget: its tiny factory, the registry lookups, trtllm-build's
checks, and greedy parity of the pytorch engine with transformers (CPU, float32, a few seconds each)."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any, ClassVar

import pytest

import generator.engine
from generator.build.trtllm import check_trtllm_compatible
from generator.convert.calibrate import calibrate_kv_cache_scales
from generator.convert.models import (
    ModelSpec,
    TinyShape,
    register,
    registered_specs,
    spec_class,
    spec_class_for_checkpoint,
    spec_for,
)
from generator.engine import SamplingConfig, run_prompts
from generator.errors import ConfigError
from generator.presets import PRESETS
from tests.factories import hf_greedy, make_tiny
from tests.test_engine import engine_for

ARCHITECTURES = sorted(registered_specs())
PROMPTS = [[1, 2, 3, 4, 5], [7, 100, 200], [42] * 11]
NEW_TOKENS = 8


def test_the_known_architectures_are_registered() -> None:
    assert {"MPTForCausalLM", "DbrxForCausalLM"} <= set(ARCHITECTURES)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_tiny_factory_greedy_parity(architecture: str, tmp_path: Path) -> None:
    """The architecture's own tiny model, converted and built, decodes transformers' greedy tokens."""
    hf_dir = make_tiny(architecture, tmp_path / "hf", TinyShape(), seed=11)
    hf_config = json.loads((hf_dir / "config.json").read_text())
    assert type(spec_for(hf_config)) is registered_specs()[architecture]
    engine = engine_for(hf_dir, tmp_path)
    checkpoint_config = json.loads((tmp_path / "checkpoint-float32" / "config.json").read_text())
    assert spec_class_for_checkpoint(checkpoint_config) is registered_specs()[architecture]
    check_trtllm_compatible(checkpoint_config)  # the default tiny model is something trtllm-build takes
    results = run_prompts(engine, PROMPTS, SamplingConfig(max_new_tokens=NEW_TOKENS))
    assert [r.token_ids for r in results] == hf_greedy(hf_dir, PROMPTS, NEW_TOKENS)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_int8_kv_calibration_runs(architecture: str, tmp_path: Path) -> None:
    """The spec's calibration knowledge (module pattern, loader, transformers fixes) fits its own tiny model."""
    hf_dir = make_tiny(architecture, tmp_path / "hf", TinyShape(num_hidden_layers=3))
    spec = spec_for(json.loads((hf_dir / "config.json").read_text()))
    scales = calibrate_kv_cache_scales(hf_dir, spec, "The quick brown fox jumps over the lazy dog. " * 4)
    assert len(scales) == 3 and all(scale > 0 for scale in scales) and len(set(scales)) == 3


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_spec_declares_its_names(architecture: str) -> None:
    cls = registered_specs()[architecture]
    assert cls.name and cls.hf_model_types and cls.calibration_qkv_modules
    assert spec_class(architecture) is cls and spec_class(architecture.upper()) is cls


def test_presets_name_registered_architectures() -> None:
    for preset in PRESETS.values():
        assert preset.architecture in registered_specs(), preset.name
        assert preset.family == spec_class(preset.architecture).name


def test_unknown_architecture_names_the_registered_ones() -> None:
    with pytest.raises(ConfigError, match="MPTForCausalLM"):
        spec_class("LlamaForCausalLM")


def test_a_second_spec_cannot_claim_a_registered_name() -> None:
    class Impostor(ModelSpec):  # only the class attributes matter: register checks names before anything else
        name: ClassVar[str] = "impostor"
        architecture: ClassVar[str] = "ImpostorForCausalLM"
        hf_model_types: ClassVar[tuple[str, ...]] = ("mpt",)

    with pytest.raises(ValueError, match="already MptSpec's"):
        register(Impostor)  # type: ignore[type-abstract]
    assert "ImpostorForCausalLM" not in registered_specs()


def _string_constants(path: Path) -> set[str]:
    return {node.value for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)}


def test_engine_has_no_architecture_names() -> None:
    """The engine runs from the checkpoint config's fields (position embedding, MoE section, clip_qkv, norms,
    biases), never from which architecture wrote it: no registered name may appear in its code."""
    names: set[Any] = set()
    for cls in registered_specs().values():
        names |= {cls.architecture, cls.name, *cls.hf_model_types, *cls.hf_architectures}
    engine_dir = Path(generator.engine.__file__).parent
    found = {f"{path.name}: {value!r}" for path in sorted(engine_dir.glob("*.py"))
             for value in _string_constants(path) if value in names}
    assert not found
