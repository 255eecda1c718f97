"""Tiny random Hugging Face checkpoints (`tiny-<architecture>`, e.g. `tiny-mpt`) built offline and deterministically.

They let the whole job (convert -> build -> render -> serve) run on a laptop CPU in seconds. The weights are
random, so the text is gibberish, but the numbers are exactly reproducible, which is what the parity tests need.
Each registered architecture builds its own model (`ModelSpec.tiny_hf_model`); this module adds what all share:
the sizes from the preset, the seed, and a byte-level BPE tokenizer trained on `generator/data/tiny_corpus.txt`,
saved in the layout the architecture's real checkpoints ship (`ModelSpec.tiny_tokenizer`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from generator.convert.models import TinyShape, spec_class, write_tiny_checkpoint
from generator.errors import GenRepoError
from generator.presets import PRESETS, Preset, get_preset

CORPUS = Path(__file__).parent / "data" / "tiny_corpus.txt"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|padding|>"
SEED = 1234
# the presets generator.tiny builds: those marked offline (one per registered architecture)
TINY_NAMES = tuple(name for name, preset in PRESETS.items() if preset.offline)
_MARKER = "gen-repo-tiny.json"
# The split regex of tokenizers' ByteLevel pre-tokenizer (GPT-2's), so tiktoken splits text the same way.
GPT2_PAT_STR = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def tiny_shape(preset: Preset, vocab_size: int) -> TinyShape:
    """The tiny model's sizes: the preset's, with the trained tokenizer's vocabulary."""
    return TinyShape(
        hidden_size=preset.hidden_size, num_attention_heads=preset.num_attention_heads,
        num_key_value_heads=preset.num_key_value_heads, num_hidden_layers=preset.num_hidden_layers,
        vocab_size=vocab_size, max_position_embeddings=preset.max_position_embeddings,
        intermediate_size=preset.intermediate_size, num_experts=preset.num_experts,
        experts_per_token=preset.experts_per_token, clip_qkv=preset.clip_qkv, rope_theta=preset.rope_theta)


def make_tiny_model(name: str, out_dir: Path) -> Path:
    """Create the tiny checkpoint `name` in `out_dir` (or reuse it if it is already there); returns `out_dir`."""
    preset = get_preset(name)
    if name not in TINY_NAMES:
        raise GenRepoError(f"{name} is not a tiny preset; tiny presets: {', '.join(TINY_NAMES)}")
    spec = spec_class(preset.architecture)
    out_dir = Path(out_dir)
    marker = out_dir / _MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("name") == name:
        return out_dir
    # Build in a sibling temp dir and move it into place, so an interrupted run leaves nothing half-written.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        tokenizer = train_tokenizer(preset.vocab_size)
        write_tiny_checkpoint(spec, staging, tiny_shape(preset, tokenizer.get_vocab_size()), seed=SEED,
                              quiet_token_ids=quiet_token_ids(tokenizer), eos_token_id=0, pad_token_id=1,
                              bos_token_id=0)
        if spec.tiny_tokenizer == "tiktoken":
            _save_tiktoken_tokenizer(tokenizer, staging)
        else:
            _save_hf_tokenizer(tokenizer, staging)
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


def quiet_token_ids(tokenizer: Any) -> list[int]:
    """Special tokens and tokens holding bytes other than printable ASCII, space and newline."""
    byte_of_char = {char: byte for byte, char in _bytes_to_unicode().items()}
    ids = []
    for token, token_id in tokenizer.get_vocab().items():
        if token in (EOS_TOKEN, PAD_TOKEN) or any(not (32 <= byte_of_char[c] < 127 or byte_of_char[c] == 10)
                                                   for c in token):
            ids.append(token_id)
    return sorted(ids)


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
    """The BPE in the tiktoken layout DBRX ships (generator.formats.tokenizer owns it): the same ranks."""
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
