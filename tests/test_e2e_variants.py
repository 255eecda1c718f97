"""Model variants through ONE real tritonserver: each tiny variant is converted, built and rendered under its
own model name prefix into one repository (one preprocessing / postprocessing pair shared by all, since they
use the same tokenizer), and each `<prefix>ensemble` answers with transformers' greedy text.

Where transformers cannot run a variant, the reference is an equivalent model it can run (GQA/MQA: the MHA
checkpoint with repeated K/V heads; logit_scale: transformers' logits times the scale), transformers with the
variant's ALiBi slopes patched in (alibi_bias_max != 8, whose slopes are checked against llm-foundry's formula
below), or the direct llm-foundry transcription of tests/engine/test_engine_variants.py (biases, qk LayerNorm,
learned positions).
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file, save_file

from generator.build import BuildSettings, build_engine
from generator.convert.job import ConvertSettings, convert_checkpoint
from generator.engine.config import alibi_slopes
from generator.formats.tokenizer import load_tokenizer
from generator.pipeline import PipelineResult, copy_tokenizer_files
from generator.serving.client import InferSettings, generate
from generator.serving.render import RenderSettings, RepositoryLayout, render_repository
from generator.serving.serve import stop_server
from generator.tiny import make_tiny_model, quiet_token_ids
from tests.conftest import RunningServer, start_test_server
from tests.convert.test_convert import make_gqa_mpt, write_variant
from tests.engine.test_engine_variants import foundry_variant, reference_greedy
from tests.factories import hf_greedy, make_dbrx, make_mpt
from tests.serving.test_e2e_contract import assert_anchor_client_texts

PROMPTS = ["What is machine learning?", "def generate(model"]
NEW_TOKENS = 8
LOGIT_SCALE = -0.5  # negative: greedy then picks a different token than without the scale
#: references take (checkpoint dir, prompts as ids, new tokens) and return the new ids of each prompt
Reference = Callable[[Path, list[list[int]], int], list[list[int]]]

pytestmark = pytest.mark.server


@dataclass(frozen=True)
class Variant:
    """One model of the shared repository: the checkpoint served, and the checkpoint + reference that
    give the expected tokens."""

    name: str                # also the model name prefix: "<name>_ensemble"
    served_dir: Path
    reference_dir: Path
    reference: Reference


# --- tiny checkpoints --------------------------------------------------------------------------------------

def tokenizer_dir(root: Path) -> Path:
    """The tiny-mpt tokenizer files (byte-level BPE) in `root/tokenizer`."""
    hf_dir = make_tiny_model("tiny-mpt", root / "tiny-mpt")
    copy_tokenizer_files(hf_dir, root / "tokenizer")
    return root / "tokenizer"


def quiet_special_and_byte_tokens(model_dir: Path, tokenizer: Path) -> Path:
    """Scale down the embedding / lm_head rows of the tokens generator.tiny keeps quiet (eos, pad, raw
    bytes), so greedy text neither ends early at eos nor splits UTF-8 characters."""
    from tokenizers import Tokenizer

    ids = quiet_token_ids(Tokenizer.from_file(str(tokenizer / "tokenizer.json")))
    tensors = load_file(model_dir / "model.safetensors")
    for name in tensors:
        if name.endswith(("wte.weight", "lm_head.weight")):
            tensors[name][ids] *= 0.05
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    return model_dir


def vocab_size(tokenizer: Path) -> int:
    """The tiny-mpt vocabulary size (its config.json is copied along with the tokenizer files)."""
    return int(json.loads((tokenizer / "config.json").read_text())["vocab_size"])


def mha_equivalent(gqa_dir: Path, target: Path) -> Path:
    """The MHA MPT that computes what the GQA/MQA one at `gqa_dir` does: each K/V head repeated for the
    query heads that share it (query head h reads K/V head h // (heads / kv_heads))."""
    config = json.loads((gqa_dir / "config.json").read_text())
    d, heads, kv_heads = config["d_model"], config["n_heads"], config["attn_config"]["kv_n_heads"]
    head_dim = d // heads
    tensors = load_file(gqa_dir / "model.safetensors")
    for name in list(tensors):
        if name.endswith("attn.Wqkv.weight"):
            q, k, v = tensors[name].split([d, kv_heads * head_dim, kv_heads * head_dim])
            k, v = (t.view(kv_heads, head_dim, d).repeat_interleave(heads // kv_heads, dim=0).reshape(d, d)
                    for t in (k, v))
            tensors[name] = torch.cat([q, k, v])
    return write_variant(gqa_dir, target, {"attn_config": {"attn_type": "multihead_attention",
                                                           "kv_n_heads": heads}}, tensors)


def foundry_gen_slopes(n_heads: int, alibi_bias_max: float) -> torch.Tensor:
    """llm-foundry's `gen_slopes` (llmfoundry/models/layers/attention.py), transcribed independently."""
    padded = 2 ** math.ceil(math.log2(n_heads))
    m = torch.arange(1, padded + 1, dtype=torch.float32).mul(alibi_bias_max / padded)
    slopes = 1.0 / torch.pow(2, m)
    if padded != n_heads:
        slopes = torch.concat([slopes[1::2], slopes[::2]])[:n_heads]
    return slopes


def hf_greedy_with_alibi_bias_max(model_dir: Path, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """transformers' MPT greedy with the checkpoint's alibi_bias_max (transformers always passes 8)."""
    from transformers.models.mpt import modeling_mpt

    bias_max = json.loads((model_dir / "config.json").read_text())["attn_config"]["alibi_bias_max"]

    def build(self: object, num_heads: int, sequence_length: int, alibi_bias_max: int = 8,
              device: object = None) -> torch.Tensor:
        return modeling_mpt.build_mpt_alibi_tensor(num_heads, sequence_length, bias_max, device)

    with mock.patch.object(modeling_mpt.MptModel, "build_mpt_alibi_tensor", build):
        return hf_greedy(model_dir, prompts, new_tokens)


def hf_greedy_with_logit_scale(model_dir: Path, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy on transformers' MPT logits times the checkpoint's logit_scale (transformers ignores it)."""
    from transformers import AutoModelForCausalLM

    scale = float(json.loads((model_dir / "config.json").read_text())["logit_scale"])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outputs = []
    with torch.no_grad():
        for prompt in prompts:
            ids = list(prompt)
            for _ in range(new_tokens):
                ids.append(int((model(torch.tensor([ids])).logits[0, -1] * scale).argmax()))
            outputs.append(ids[len(prompt):])
    return outputs


def make_variants(root: Path, tokenizer: Path) -> list[Variant]:
    """The world-size-1 variants: MPT attention / position / output options and DBRX attention x experts."""
    vocab = vocab_size(tokenizer)

    def mpt(name: str, seed: int, **options: Any) -> Path:
        return quiet_special_and_byte_tokens(make_mpt(root / name, seed=seed, vocab_size=vocab, **options), tokenizer)

    def dbrx(name: str, kv_heads: int, experts: int, top_k: int, seed: int) -> Variant:
        hf_dir = quiet_special_and_byte_tokens(make_dbrx(root / name, seed=seed, vocab_size=vocab,
                                                         kv_n_heads=kv_heads, num_experts=experts, top_k=top_k),
                                               tokenizer)
        return Variant(name, hf_dir, hf_dir, hf_greedy)

    def gqa(name: str, kv_heads: int, seed: int) -> Variant:
        served = make_gqa_mpt(mpt(f"{name}-base", seed), root / name, kv_heads)
        return Variant(name, served, mha_equivalent(served, root / f"{name}-mha"), hf_greedy)

    clip = mpt("mpt_clip_qkv", 41, attn_config={"clip_qkv": 0.6})
    alibi = mpt("mpt_alibi16", 22, attn_config={"alibi_bias_max": 16})
    scaled = mpt("mpt_logit_scale", 23, logit_scale=LOGIT_SCALE)
    foundry = foundry_variant(mpt("mpt_foundry-base", 24), root / "mpt_foundry")
    return [
        Variant("mpt_clip_qkv", clip, clip, hf_greedy),
        gqa("mpt_gqa", 2, 25),
        gqa("mpt_mqa", 1, 26),
        Variant("mpt_alibi16", alibi, alibi, hf_greedy_with_alibi_bias_max),
        Variant("mpt_foundry", foundry, foundry, reference_greedy),
        Variant("mpt_logit_scale", scaled, scaled, hf_greedy_with_logit_scale),
        dbrx("dbrx_gqa_4x2", 2, 4, 2, 31),
        dbrx("dbrx_mqa_8x3", 1, 8, 3, 32),
        dbrx("dbrx_gqa_16x4", 2, 16, 4, 33),
    ]


def add_to_repository(variant: Variant, root: Path, tokenizer: Path, repository: Path,
                      shared_pre_post_prefix: str | None) -> None:
    """convert -> build -> render `variant` into `repository` under the prefix `<name>_`."""
    checkpoint = convert_checkpoint(ConvertSettings(variant.served_dir, root / f"{variant.name}-checkpoint",
                                                    dtype="float32", progress=False))
    engine = build_engine(BuildSettings(checkpoint, root / f"{variant.name}-engine", max_batch_size=2,
                                        max_input_len=32, max_seq_len=64))
    render_repository(RenderSettings(engine_dir=engine, tokenizer_dir=tokenizer, output_dir=repository,
                                     layout=RepositoryLayout(model_name_prefix=f"{variant.name}_",
                                                             shared_pre_post_prefix=shared_pre_post_prefix)))


def session_rss_bytes(pid: int) -> int:
    """Resident memory of every process in the session of `pid` (the server, its ranks and python stubs)."""
    from generator.serving.serve import _session_members

    total = 0
    for member in _session_members(pid):
        try:
            status = Path(f"/proc/{member}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


class PeakMemory(threading.Thread):
    """Samples `session_rss_bytes(pid)` every `period_s` until stopped; `peak` is the largest sample."""

    def __init__(self, pid: int, period_s: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.pid, self.period_s, self.peak = pid, period_s, 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, session_rss_bytes(self.pid))
            self._stop_event.wait(self.period_s)

    def stop(self) -> int:
        """Stop sampling; returns the peak in bytes."""
        self._stop_event.set()
        self.join()
        return self.peak


def assert_served_texts(server: RunningServer, expected: dict[str, str], model: str = "ensemble",
                        with_bls: bool = False) -> None:
    """Each prompt's answer (gRPC and HTTP; `with_bls`: also `<prefix>tensorrt_llm_bls` over gRPC) is the
    expected text of its NEW_TOKENS new tokens."""
    targets = [("grpc", server.grpc_url, model), ("http", server.http_url, model)]
    if with_bls:
        targets.append(("grpc", server.grpc_url, model.removesuffix("ensemble") + "tensorrt_llm_bls"))
    for prompt, text in expected.items():
        for protocol, url, target in targets:
            answer = generate(InferSettings(prompt=prompt, url=url, protocol=protocol, model=target,
                                            max_tokens=NEW_TOKENS, exclude_input_in_output=True, timeout_s=120))
            assert answer.text == text, (prompt, protocol, target)


# --- fixtures ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VariantServer:
    """The one server, the variants it serves, their expected texts and the server's resident memory."""

    server: RunningServer
    variants: list[Variant]
    expected: dict[tuple[str, str], str]      # (variant name, prompt) -> text
    rss_bytes: int                            # once all models are loaded


@pytest.fixture(scope="module")
def variant_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VariantServer]:
    root = tmp_path_factory.mktemp("variants")
    tokenizer = tokenizer_dir(root)
    text_tokenizer = load_tokenizer(tokenizer)
    prompt_ids = [text_tokenizer.encode(prompt) for prompt in PROMPTS]
    variants = make_variants(root, tokenizer)
    repository = root / "triton_repo"
    expected = {}
    for index, variant in enumerate(variants):
        add_to_repository(variant, root, tokenizer, repository, None if index == 0 else f"{variants[0].name}_")
        for prompt, ids in zip(PROMPTS, variant.reference(variant.reference_dir, prompt_ids, NEW_TOKENS),
                               strict=True):
            expected[(variant.name, prompt)] = text_tokenizer.decode(ids)
    job = PipelineResult(output_dir=root, hf_dir=variants[0].served_dir, checkpoint_dir=root, engine_dir=root,
                         tokenizer_dir=tokenizer, triton_repo=repository)
    started = time.monotonic()
    server, process = start_test_server(job, root / "tritonserver.log")
    memory = PeakMemory(process.pid)
    memory.start()
    try:
        rss = session_rss_bytes(process.pid)
        print(f"\n{len(variants)} variants ready in {time.monotonic() - started:.1f} s, "
              f"server resident memory {rss / 2**30:.2f} GiB")
        yield VariantServer(server, variants, expected, rss)
    finally:
        print(f"\nserver peak resident memory {memory.stop() / 2**30:.2f} GiB")
        stop_server(process, shm_prefix=server.shm_prefix)


# --- tests -------------------------------------------------------------------------------------------------

#: world-size-1 variants also asked by the anchor-shaped client (tiny MPT at TP1 is in test_e2e_contract.py)
ANCHOR_CLIENT_VARIANTS = ("dbrx_gqa_4x2",)


@pytest.mark.parametrize(("heads", "bias_max"), [(1, 8), (3, 8), (4, 16), (6, 4), (8, 16), (12, 8), (48, 8)])
def test_alibi_slopes_follow_llm_foundry(heads: int, bias_max: float) -> None:
    torch.testing.assert_close(alibi_slopes(heads, bias_max), foundry_gen_slopes(heads, bias_max), rtol=0, atol=0)


def test_mha_equivalent_of_gqa_is_exact(tmp_path: Path) -> None:
    """The reference of the GQA/MQA variants: the MHA copy computes the same tokens as the GQA model."""
    base = make_mpt(tmp_path / "base", seed=3)
    gqa = make_gqa_mpt(base, tmp_path / "gqa", 2)
    ids = [[5, 6, 7, 8], [300, 2, 40]]
    assert hf_greedy(mha_equivalent(gqa, tmp_path / "mha"), ids, 6) == reference_greedy(gqa, ids, 6)


def test_one_server_serves_every_variant(variant_server: VariantServer) -> None:
    first = variant_server.variants[0].name
    expected = {f"{first}_preprocessing", f"{first}_postprocessing"}  # one pair for all: the stubs stay few
    expected |= {f"{variant.name}_{model}" for variant in variant_server.variants
                 for model in ("tensorrt_llm", "ensemble", "tensorrt_llm_bls")}
    assert {path.name for path in variant_server.server.job.triton_repo.iterdir()} == expected
    assert variant_server.rss_bytes < int(os.environ.get("GEN_REPO_TEST_MAX_SERVER_RSS", 10 * 2**30))


@pytest.mark.parametrize("name", ["mpt_clip_qkv", "mpt_gqa", "mpt_mqa", "mpt_alibi16", "mpt_foundry",
                                  "mpt_logit_scale", "dbrx_gqa_4x2", "dbrx_mqa_8x3", "dbrx_gqa_16x4"])
def test_variant_served_text_equals_reference_greedy(variant_server: VariantServer, name: str) -> None:
    expected = {prompt: variant_server.expected[(name, prompt)] for prompt in PROMPTS}
    assert_served_texts(variant_server.server, expected, model=f"{name}_ensemble", with_bls=True)
    if name in ANCHOR_CLIENT_VARIANTS:  # a client shaped like the anchor's end_to_end_grpc_client.py (issue 8)
        for model in ("ensemble", "tensorrt_llm_bls"):
            assert_anchor_client_texts(variant_server.server, f"{name}_{model}", PROMPTS[0],
                                       expected[PROMPTS[0]], NEW_TOKENS)
