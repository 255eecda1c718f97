"""Tiny random Hugging Face checkpoints (`tiny-mpt`, `tiny-dbrx`) built offline and deterministically.

They let the whole job (convert -> build -> render -> serve) run on a laptop CPU in seconds. The weights are
random, so the text is gibberish, but the numbers are exactly reproducible, which is what the parity tests need.
The tokenizer is a byte-level BPE trained on `generator/data/tiny_corpus.txt`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from generator.errors import GenRepoError
from generator.presets import Preset, get_preset

CORPUS = Path(__file__).parent / "data" / "tiny_corpus.txt"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|padding|>"
# A larger std than transformers' default so greedy logits are well separated and parity does not hinge on
# float rounding.
INIT_STD = 0.15
SEED = 1234
TINY_NAMES = ("tiny-mpt", "tiny-dbrx")
_MARKER = "gen-repo-tiny.json"
# The split regex of tokenizers' ByteLevel pre-tokenizer (GPT-2's), so tiktoken splits text the same way.
GPT2_PAT_STR = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def make_tiny_model(name: str, out_dir: Path) -> Path:
    """Create the tiny checkpoint `name` in `out_dir` (or reuse it if it is already there); returns `out_dir`."""
    preset = get_preset(name)
    if name not in TINY_NAMES:
        raise GenRepoError(f"{name} is not a tiny preset; tiny presets: {', '.join(TINY_NAMES)}")
    out_dir = Path(out_dir)
    marker = out_dir / _MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("name") == name:
        return out_dir
    # Build in a sibling temp dir and move it into place, so an interrupted run leaves nothing half-written.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        tokenizer = train_tokenizer(preset.vocab_size)
        if name == "tiny-mpt":
            _save_mpt(preset, staging, tokenizer)
            _save_hf_tokenizer(tokenizer, staging)
        else:
            _save_dbrx(preset, staging, tokenizer)
            _save_tiktoken_tokenizer(tokenizer, staging)
        (staging / _MARKER).write_text(json.dumps({"name": name, "seed": SEED}) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out_dir


def train_tokenizer(vocab_size: int) -> Any:
    """A byte-level BPE (`tokenizers.Tokenizer`) trained on the shipped corpus; ids 0 and 1 are eos and pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN, PAD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(CORPUS.read_text(encoding="utf-8").splitlines(keepends=True), trainer=trainer)
    return tokenizer


def _randomize(model: Any, seed: int, quiet_token_ids: list[int]) -> None:
    """Random weights; the embedding / lm_head rows of `quiet_token_ids` are scaled down so greedy decoding
    (almost) never picks them: random text made of raw bytes would not be valid UTF-8 piece by piece."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                # norms near 1 but not exactly, so a converter that drops them shows up in the parity tests
                parameter.copy_(1.0 + 0.1 * torch.randn(parameter.shape, generator=generator))
            else:
                parameter.copy_(INIT_STD * torch.randn(parameter.shape, generator=generator))
            if name.endswith(("wte.weight", "lm_head.weight")):
                parameter[quiet_token_ids] *= 0.05


def quiet_token_ids(tokenizer: Any) -> list[int]:
    """Special tokens and tokens holding bytes other than printable ASCII, space and newline."""
    byte_of_char = {char: byte for byte, char in _bytes_to_unicode().items()}
    ids = []
    for token, token_id in tokenizer.get_vocab().items():
        if token in (EOS_TOKEN, PAD_TOKEN) or any(not (32 <= byte_of_char[c] < 127 or byte_of_char[c] == 10)
                                                   for c in token):
            ids.append(token_id)
    return sorted(ids)


def _save_mpt(preset: Preset, out_dir: Path, tokenizer: Any) -> None:
    import torch
    from transformers import MptConfig, MptForCausalLM

    config = MptConfig(
        d_model=preset.hidden_size, n_heads=preset.num_attention_heads, n_layers=preset.num_hidden_layers,
        expansion_ratio=preset.intermediate_size // preset.hidden_size, max_seq_len=preset.max_position_embeddings,
        vocab_size=tokenizer.get_vocab_size(), no_bias=True, norm_type="low_precision_layernorm",
        attn_config={"alibi": True, "alibi_bias_max": 8, "clip_qkv": None, "attn_impl": "torch"},
        eos_token_id=0, pad_token_id=1, bos_token_id=0)
    torch.manual_seed(SEED)
    model = MptForCausalLM(config).eval()
    _randomize(model, SEED, quiet_token_ids(tokenizer))
    model.save_pretrained(out_dir)


def _save_dbrx(preset: Preset, out_dir: Path, tokenizer: Any) -> None:
    import torch
    from transformers import DbrxConfig, DbrxForCausalLM

    theta = preset.rope_theta or 10000.0
    # transformers 5.x reads RoPE from rope_parameters and ignores attn_config.rope_theta; write both.
    config = DbrxConfig(
        d_model=preset.hidden_size, n_heads=preset.num_attention_heads, n_layers=preset.num_hidden_layers,
        max_seq_len=preset.max_position_embeddings, vocab_size=tokenizer.get_vocab_size(),
        attn_config={"kv_n_heads": preset.num_key_value_heads, "clip_qkv": preset.clip_qkv, "rope_theta": theta},
        ffn_config={"ffn_hidden_size": preset.intermediate_size, "moe_num_experts": preset.num_experts,
                    "moe_top_k": preset.experts_per_token, "ffn_act_fn": {"name": "silu"},
                    "moe_normalize_expert_weights": 1.0},
        rope_parameters={"rope_theta": theta, "rope_type": "default"}, tie_word_embeddings=False,
        eos_token_id=0, pad_token_id=1, bos_token_id=0)
    torch.manual_seed(SEED)
    model = DbrxForCausalLM(config).eval()
    _randomize(model, SEED, quiet_token_ids(tokenizer))
    model.save_pretrained(out_dir)


def _save_hf_tokenizer(tokenizer: Any, out_dir: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                   bos_token=EOS_TOKEN, unk_token=EOS_TOKEN)
    fast.save_pretrained(out_dir)
    # transformers 5 writes "TokenizersBackend", which 4.x (and Triton containers pinned to it) cannot load.
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def _save_tiktoken_tokenizer(tokenizer: Any, out_dir: Path) -> None:
    """DBRX ships a tiktoken tokenizer: save the same BPE ranks in that layout (generator.formats.tokenizer owns it)."""
    from generator.formats.tokenizer import save_tiktoken_tokenizer

    save_tiktoken_tokenizer(bpe_ranks(tokenizer), {EOS_TOKEN: 0, PAD_TOKEN: 1}, out_dir, eos_token=EOS_TOKEN,
                            pad_token=PAD_TOKEN, pat_str=GPT2_PAT_STR, encoding_name="tiny_bpe")


def bpe_ranks(tokenizer: Any) -> dict[bytes, int]:
    """The trained BPE as tiktoken's `{token bytes: rank}` (ByteLevel's printable characters mapped back to bytes)."""
    byte_of_char = {char: byte for byte, char in _bytes_to_unicode().items()}
    specials = {EOS_TOKEN, PAD_TOKEN}
    return {bytes(byte_of_char[c] for c in token): rank
            for token, rank in tokenizer.get_vocab().items() if token not in specials}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which ByteLevel uses for its vocabulary."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + extra)
            extra += 1
    return table
