"""generator.formats.tokenizer (HF and tiktoken/DBRX layouts) and the token helpers the Triton models use."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from generator.errors import GenRepoError
from generator.formats.tokenizer import is_tiktoken_dir, load_tokenizer, save_tiktoken_tokenizer
from generator.serving.triton_models.common import (
    Utf8HoldBack,
    from_word_list_format,
    parse_bool,
    to_word_list_format,
)

TEXT = "def héllo(wörld): return '日本語' + \"🙂\"  # ünïcode"
CORPUS = ["def hello(world):\n    return world\n", "the quick brown fox jumps over the lazy dog\n",
          "import numpy as np\nfor i in range(10):\n    print(i)\n"] * 20
# GPT-2's split regex (what the ByteLevel pre-tokenizer uses)
GPT2_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def train_hf_tokenizer(out_dir: Path, with_pad: bool = True) -> Path:
    """A byte-level BPE (vocab 300) trained on a few lines, saved as a Hugging Face tokenizer dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|padding|>"] if with_pad else ["<|endoftext|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>",
                                   pad_token="<|padding|>" if with_pad else None)
    fast.save_pretrained(out_dir)
    return out_dir


def small_encoding(name: str = "tiny_bytes"):  # -> tiktoken.Encoding
    """A byte-level tiktoken Encoding built offline: 256 single bytes plus a few ASCII merges."""
    import tiktoken

    ranks = {bytes([i]): i for i in range(256)}
    for merge in (b"he", b"ll", b"hell", b"re", b"tu", b"rn", b"de", b"def", b" r", b"ur"):
        ranks[merge] = len(ranks)
    return tiktoken.Encoding(name=name, pat_str=GPT2_PAT, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": len(ranks), "<|pad|>": len(ranks) + 1})


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_hf_tokenizer(tmp_path_factory.mktemp("hf_tokenizer"))


def test_hf_tokenizer_round_trip(hf_dir: Path) -> None:
    tokenizer = load_tokenizer(hf_dir)
    ids = tokenizer.encode(TEXT, add_special_tokens=True)
    assert len(ids) > 10 and all(isinstance(i, int) for i in ids)
    assert tokenizer.decode(ids) == TEXT
    eos = tokenizer.eos_token_id
    assert eos is not None and tokenizer.pad_token_id is not None and tokenizer.pad_token_id != eos
    assert tokenizer.decode([*ids, eos], skip_special_tokens=True) == TEXT
    assert tokenizer.decode([*ids, eos], skip_special_tokens=False) == TEXT + "<|endoftext|>"
    assert tokenizer.vocab_size == 300


def test_hf_tokenizer_pad_falls_back_to_eos(tmp_path: Path) -> None:
    tokenizer = load_tokenizer(train_hf_tokenizer(tmp_path, with_pad=False))
    assert tokenizer.pad_token_id == tokenizer.eos_token_id is not None


def test_missing_dir_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(GenRepoError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")


def test_tiktoken_layout_round_trip(tmp_path: Path) -> None:
    encoding = small_encoding()
    out = save_tiktoken_tokenizer(encoding, {}, tmp_path / "tok", eos_token="<|endoftext|>", pad_token="<|pad|>")
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "TiktokenTokenizerWrapper" and is_tiktoken_dir(config)
    assert (out / "cl100k_base.tiktoken").is_file()
    tokenizer = load_tokenizer(out)
    ids = tokenizer.encode(TEXT)
    assert ids == encoding.encode(TEXT)
    assert tokenizer.decode(ids) == TEXT
    eos, pad = encoding._special_tokens["<|endoftext|>"], encoding._special_tokens["<|pad|>"]
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (eos, pad)
    assert tokenizer.encode("hello<|pad|>") == [*encoding.encode("hello"), pad]
    assert tokenizer.decode([*ids, eos, pad], skip_special_tokens=True) == TEXT
    assert tokenizer.decode([*ids, eos], skip_special_tokens=False) == TEXT + "<|endoftext|>"


def test_dbrx_special_token_layout(tmp_path: Path) -> None:
    # DBRX: cl100k_base (specials from 100257) plus the wrapper's added tokens <|pad|>, <|im_start|>, <|im_end|>
    ranks = {bytes([i]): i for i in range(256)}
    specials = {"<|endoftext|>": 100257, "<|pad|>": 100277, "<|im_start|>": 100278, "<|im_end|>": 100279}
    out = save_tiktoken_tokenizer(ranks, specials, tmp_path / "dbrx", eos_token="<|endoftext|>", pad_token="<|pad|>",
                                  pat_str=GPT2_PAT)
    tokenizer = load_tokenizer(out)
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (100257, 100277)
    assert tokenizer.vocab_size == 100280
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 100278 and ids[-1] == 100279
    assert tokenizer.decode(ids) == "user\nhi"
    # ids the table lacks (the gap between ranks and specials) decode to nothing, as the wrapper does
    assert tokenizer.decode([104, 5000, 105]) == "hi"


def test_remote_code_dir_is_never_executed(tmp_path: Path) -> None:
    # the layout of databricks/dbrx-*: tiktoken.py + a config naming it, and no local rank file
    directory = tmp_path / "dbrx_remote"
    directory.mkdir()
    marker = tmp_path / "remote_code_ran"
    (directory / "tiktoken.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "auto_map": {"AutoTokenizer": ["tiktoken.TiktokenTokenizerWrapper", None]},
        "tokenizer_class": "TiktokenTokenizerWrapper", "encoding_name": "no_such_encoding",
        "eos_token": "<|endoftext|>", "pad_token": "<|pad|>",
        "added_tokens_decoder": {"100277": {"content": "<|pad|>", "special": True}}}))
    with pytest.raises(GenRepoError, match=r"tiktoken tokenizer .* without a local \*\.tiktoken rank file"):
        load_tokenizer(directory)
    assert not marker.exists()


def stream(tokenizer, ids: list[int], hold_back: bool) -> list[str]:
    """The text chunks postprocessing sends when tensorrt_llm streams `ids` one token at a time."""
    holdback = Utf8HoldBack(lambda held: tokenizer.decode(held, skip_special_tokens=False)) if hold_back else None
    chunks = []
    for index, token in enumerate(ids):
        ready = holdback.push([token]) if holdback else [token]
        if holdback and index == len(ids) - 1:
            ready += holdback.flush()
        if ready:
            chunks.append(tokenizer.decode(ready))
    return chunks


@pytest.mark.parametrize("kind", ["hf", "tiktoken"])
def test_streamed_chunks_join_to_the_whole_text(kind: str, hf_dir: Path, tmp_path: Path) -> None:
    if kind == "hf":
        tokenizer = load_tokenizer(hf_dir)
    else:
        tokenizer = load_tokenizer(save_tiktoken_tokenizer(small_encoding(), {}, tmp_path / "tok",
                                                           eos_token="<|endoftext|>"))
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    chunks = stream(tokenizer, ids, hold_back=True)
    assert "".join(chunks) == tokenizer.decode(ids) == TEXT
    assert not any("\ufffd" in chunk for chunk in chunks)
    # without the guard, multi-byte characters split across tokens show up broken
    assert any("\ufffd" in chunk for chunk in stream(tokenizer, ids, hold_back=False))


def test_holdback_gives_up_on_invalid_bytes() -> None:
    # a lone continuation byte never completes: it is released after MAX_HELD tokens, not held forever
    decode = lambda ids: bytes(ids).decode("utf-8", errors="replace")  # noqa: E731
    holdback = Utf8HoldBack(decode)
    released = [holdback.push([0x80]) for _ in range(Utf8HoldBack.MAX_HELD)]
    assert released[:-1] == [[]] * (Utf8HoldBack.MAX_HELD - 1)
    assert released[-1] == [0x80] * Utf8HoldBack.MAX_HELD
    assert holdback.push([0xC3]) == [] and holdback.push([0xA9]) == [0xC3, 0xA9]


def test_word_list_format() -> None:
    vocab = {"hello": [5, 6], "world": [7], "": [], "x": [9]}
    array = to_word_list_format([["hello", "world", ""], ["x"]], vocab.__getitem__)
    assert array.dtype == np.int32 and array.shape == (2, 2, 3)
    assert array[0].tolist() == [[5, 6, 7], [2, 3, -1]]
    assert array[1].tolist() == [[9, 0, 0], [1, -1, -1]]
    assert from_word_list_format(array[0]) == [[5, 6], [7]]
    assert from_word_list_format(array[1]) == [[9]]
    assert to_word_list_format([[]], vocab.__getitem__).tolist() == [[[0], [-1]]]


def test_parse_bool() -> None:
    assert [parse_bool(v, False) for v in ("true", "1", "T", "yes", "y")] == [True] * 5
    assert [parse_bool(v, True) for v in ("false", "0", "f", "no", "N")] == [False] * 5
    assert parse_bool("maybe", True) is True and parse_bool(None, False) is False


def test_dbrx_config_with_local_cl100k_rank_file(tmp_path: Path) -> None:
    # a DBRX-style config naming the encoding by model ("gpt-4" -> cl100k_base) with the rank file copied in
    import tiktoken

    from generator.formats.tokenizer import CL100K_PAT_STR

    directory = tmp_path / "dbrx"
    save_tiktoken_tokenizer({bytes([i]): i for i in range(256)}, {"<|endoftext|>": 100257}, directory,
                            eos_token="<|endoftext|>")
    config = json.loads((directory / "tokenizer_config.json").read_text())
    for key in ("tiktoken_pat_str", "tiktoken_rank_file", "encoding_name"):
        config.pop(key)
    config["model_name"] = "gpt-4"
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = load_tokenizer(directory)
    assert tiktoken.model.encoding_name_for_model("gpt-4") == "cl100k_base"
    assert tokenizer.encoding._pat_str == CL100K_PAT_STR  # type: ignore[attr-defined]
    assert tokenizer.decode(tokenizer.encode("it's 2024!")) == "it's 2024!"
    assert tokenizer.eos_token_id == 100257


def test_remote_code_tokenizer_with_tokenizer_json(hf_dir: Path, tmp_path: Path) -> None:
    # Replit-style: tokenizer_config names a custom class, but tokenizer.json is there: load it, run no code
    directory = tmp_path / "replit_like"
    directory.mkdir()
    (directory / "tokenizer.json").write_text((hf_dir / "tokenizer.json").read_text())
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="ReplitLMTokenizer",
                  auto_map={"AutoTokenizer": ["replit_lm_tokenizer.ReplitLMTokenizer", None]})
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    marker = tmp_path / "remote_code_ran"
    (directory / "replit_lm_tokenizer.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    tokenizer, reference = load_tokenizer(directory), load_tokenizer(hf_dir)
    assert tokenizer.encode(TEXT) == reference.encode(TEXT)
    assert tokenizer.eos_token_id == reference.eos_token_id is not None
    assert not marker.exists()
    (directory / "tokenizer.json").unlink()
    with pytest.raises(GenRepoError, match="trust-remote-code"):
        load_tokenizer(directory)
    assert not marker.exists()


def train_metaspace_tokenizer(out_dir: Path) -> Path:
    """A SentencePiece-style BPE (Metaspace: words start with "▁", decoding drops the text's leading space)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "</s>"])
    tokenizer.train_from_iterator(CORPUS, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>").save_pretrained(out_dir)
    return out_dir


@pytest.mark.parametrize("kind", ["byte-level", "metaspace"])
def test_chunk_decoder_keeps_the_spaces_between_chunks(kind: str, hf_dir: Path, tmp_path: Path) -> None:
    from generator.serving.triton_models.common import ChunkDecoder

    directory = hf_dir if kind == "byte-level" else train_metaspace_tokenizer(tmp_path / "metaspace")
    tokenizer = load_tokenizer(directory)
    prompt = tokenizer.encode("def hello", add_special_tokens=False)
    generated = tokenizer.encode("def hello(world): return the quick fox", add_special_tokens=False)[len(prompt):]
    whole = tokenizer.decode(prompt + generated)
    continuation = whole[len(tokenizer.decode(prompt)):]
    assert continuation.startswith("(") or continuation.startswith(" ")
    decoder = ChunkDecoder(tokenizer)
    assert "".join(decoder.decode([token]) for token in generated) == continuation
    # plain per-token decoding glues the words together for Metaspace (that is what ChunkDecoder is for)
    plain = "".join(tokenizer.decode([token]) for token in generated)
    assert (plain == continuation) == (kind == "byte-level")


def test_tiktoken_wrapper_dir_with_tokenizer_json_loads_offline(hf_dir: Path, tmp_path: Path) -> None:
    # newer DBRX revisions: the wrapper's config plus a tokenizer.json, no rank file -> tokenizer.json, no network
    directory = tmp_path / "dbrx_new"
    directory.mkdir()
    (directory / "tokenizer.json").write_text((hf_dir / "tokenizer.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "TiktokenTokenizerWrapper", "encoding_name": "no_such_encoding",
        "auto_map": {"AutoTokenizer": ["tiktoken.TiktokenTokenizerWrapper", None]},
        "eos_token": "<|endoftext|>", "pad_token": "<|padding|>"}))
    tokenizer, reference = load_tokenizer(directory), load_tokenizer(hf_dir)
    assert tokenizer.encode(TEXT) == reference.encode(TEXT)
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (reference.eos_token_id, reference.pad_token_id)
