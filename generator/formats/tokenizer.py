"""Tokenizers for preprocessing / postprocessing: Hugging Face tokenizer dirs and tiktoken-based ones.

`load_tokenizer(dir)` returns an object with `encode`, `decode`, `eos_token_id`, `pad_token_id`,
`bos_token_id` and `vocab_size`, whatever the tokenizer family.

DBRX's checkpoints ship their tokenizer as remote code (`tiktoken.py` defining `TiktokenTokenizerWrapper`, a
`PreTrainedTokenizer` over tiktoken's cl100k_base, plus extra tokens in `added_tokens_decoder`). We never run
that code: we recognise the layout from `tokenizer_config.json` and build the same tokenizer on tiktoken
ourselves, from a local `*.tiktoken` rank file when the directory has one (offline), else from tiktoken's
named encoding (which downloads its rank file once). `save_tiktoken_tokenizer` writes that layout offline.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from generator.errors import ConfigError, GenRepoError

#: `tokenizer_class` (or `auto_map` entry) of tiktoken-based remote-code tokenizers (DBRX, llm-foundry).
TIKTOKEN_WRAPPER_CLASS = "TiktokenTokenizerWrapper"
#: Our own key in `tokenizer_config.json`: the regex tiktoken splits text with before BPE.
PAT_STR_KEY = "tiktoken_pat_str"
#: Our own key: the file, relative to the tokenizer dir, holding the base64 rank table.
RANK_FILE_KEY = "tiktoken_rank_file"
DEFAULT_ENCODING = "cl100k_base"
#: cl100k_base's split regex (tiktoken_ext.openai_public builds it inside a function that downloads the ranks)
CL100K_PAT_STR = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
                  r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")


class Tokenizer(Protocol):
    """What preprocessing / postprocessing need from a tokenizer."""

    eos_token_id: int | None
    pad_token_id: int | None
    bos_token_id: int | None

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class HFTokenizer:
    """A Hugging Face `AutoTokenizer`, with pad falling back to eos like tensorrtllm_backend does."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.eos_token_id: int | None = self._tokenizer.eos_token_id
        self.bos_token_id: int | None = self._tokenizer.bos_token_id
        pad = self._tokenizer.pad_token_id
        self.pad_token_id: int | None = pad if pad is not None else self.eos_token_id
        self.vocab_size: int = len(self._tokenizer)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`."""
        return list(self._tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; no clean-up of spaces, so that decoded chunks join to the decoded whole."""
        return str(self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens,
                                          clean_up_tokenization_spaces=False))


class JsonTokenizer:
    """A `tokenizer.json` run by the `tokenizers` library alone, specials named by tokenizer_config.json."""

    def __init__(self, path: Path, config: dict[str, Any]) -> None:
        from tokenizers import Tokenizer as RawTokenizer

        self._tokenizer = RawTokenizer.from_file(str(path / "tokenizer.json"))

        def token_id(key: str) -> int | None:
            text = _token_text(config.get(key))
            return self._tokenizer.token_to_id(text) if text is not None else None

        self.eos_token_id: int | None = token_id("eos_token")
        self.bos_token_id: int | None = token_id("bos_token")
        pad = token_id("pad_token")
        self.pad_token_id: int | None = pad if pad is not None else self.eos_token_id
        self.vocab_size: int = self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`."""
        return list(self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`."""
        return str(self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens))


@dataclass
class TiktokenTokenizer:
    """A tiktoken `Encoding` plus the Hugging Face-style special tokens of a `TiktokenTokenizerWrapper` dir."""

    encoding: Any
    added_tokens: dict[str, int] = field(default_factory=dict)
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    add_bos_token: bool = False
    add_eos_token: bool = False

    def __post_init__(self) -> None:
        self._special_ids = set(self.added_tokens.values()) | set(self.encoding._special_tokens.values())
        if self.pad_token_id is None:
            self.pad_token_id = self.eos_token_id

    @property
    def vocab_size(self) -> int:
        """One past the largest id (the table may have gaps, as cl100k_base does)."""
        return max([self.encoding.n_vocab, *[i + 1 for i in self.added_tokens.values()]])

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special-token text (e.g. `<|im_start|>`) becomes its id, as in the wrapper."""
        ids: list[int] = list(self.encoding.encode(text, allowed_special="all"))
        if add_special_tokens:
            if self.add_bos_token and self.bos_token_id is not None:
                ids.insert(0, self.bos_token_id)
            if self.add_eos_token and self.eos_token_id is not None:
                ids.append(self.eos_token_id)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; ids the table lacks (gaps, ids past the table) decode to nothing, as in the wrapper."""
        data = bytearray()
        for token_id in (int(i) for i in ids):
            if skip_special_tokens and token_id in self._special_ids:
                continue
            try:
                data += self.encoding.decode_single_token_bytes(token_id)
            except KeyError:
                continue
        return data.decode("utf-8", errors="replace")


def longest_token_bytes(tokenizer: Tokenizer) -> int:
    """The most UTF-8 bytes of prompt text one token can stand for: the longest token decoded alone, plus one
    for the leading space a SentencePiece decoder strips from a first token. A prompt of more than
    max_input_len times this many bytes cannot fit in max_input_len tokens, so it can be refused without
    tokenizing it (normalizers that delete or compose characters are assumed away)."""
    ids = [[token_id] for token_id in range(tokenizer.vocab_size)]
    # one batch call into the Rust decoder where there is one (150k tokens in well under a second); no space
    # clean-up, which would shorten " ." and so make the bound too small
    if isinstance(tokenizer, HFTokenizer):
        texts = tokenizer._tokenizer.batch_decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    elif isinstance(tokenizer, JsonTokenizer):
        texts = tokenizer._tokenizer.decode_batch(ids, skip_special_tokens=False)
    else:
        texts = [tokenizer.decode(one, skip_special_tokens=False) for one in ids]
    return max((len(text.encode("utf-8", errors="replace")) for text in texts), default=1) + 1


def read_tokenizer_config(path: Path) -> dict[str, Any]:
    """`tokenizer_config.json` of a tokenizer dir, or {} when it has none."""
    config_file = Path(path) / "tokenizer_config.json"
    if not config_file.is_file():
        return {}
    try:
        return dict(json.loads(config_file.read_text()))
    except json.JSONDecodeError as error:
        raise ConfigError(f"{config_file}: not valid JSON ({error})") from error


def is_tiktoken_dir(config: dict[str, Any]) -> bool:
    """True when a tokenizer config names the tiktoken wrapper (DBRX layout)."""
    if config.get("tokenizer_class") == TIKTOKEN_WRAPPER_CLASS:
        return True
    auto_map = json.dumps(config.get("auto_map", {}))
    return TIKTOKEN_WRAPPER_CLASS in auto_map


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> Tokenizer:
    """Load the tokenizer in `path`: tiktoken-wrapper dirs without running their code, else `AutoTokenizer`."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"tokenizer dir {path} does not exist")
    config = read_tokenizer_config(path)
    if is_tiktoken_dir(config) and not trust_remote_code:
        # newer DBRX revisions also ship tokenizer.json: use it when there is no local rank file (offline)
        if _rank_files(path, config) or not (path / "tokenizer.json").is_file():
            return _load_tiktoken_dir(path, config)
        return HFTokenizer(_fast_from_tokenizer_json(path, config))
    try:
        return HFTokenizer(_load_hf_tokenizer(path, config, trust_remote_code))
    except ImportError as error:
        # transformers does not import everywhere a server runs (e.g. an image built for numpy 2 once numpy<2
        # is first on the path); a tokenizer.json needs only the `tokenizers` library.
        if not (path / "tokenizer.json").is_file():
            raise ConfigError(f"cannot load the tokenizer in {path}: transformers failed to import ({error})") \
                from error
        return JsonTokenizer(path, config)


def _load_hf_tokenizer(path: Path, config: dict[str, Any], trust_remote_code: bool) -> Any:
    """`AutoTokenizer`; for a remote-code tokenizer that also ships tokenizer.json (e.g. Replit), that file."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        needs_code = "auto_map" in config and not trust_remote_code
        if not needs_code:
            raise ConfigError(f"cannot load a tokenizer from {path}: {error}") from error
        if not (path / "tokenizer.json").is_file():
            raise ConfigError(f"the tokenizer in {path} needs its own Python code ({config['auto_map']}); "
                              f"pass --trust-remote-code to allow it") from error
    return _fast_from_tokenizer_json(path, config)


def _fast_from_tokenizer_json(path: Path, config: dict[str, Any]) -> Any:
    """A fast tokenizer straight from tokenizer.json, with the special tokens tokenizer_config.json names."""
    from transformers import PreTrainedTokenizerFast

    specials = {key: _token_text(config.get(key)) for key in ("bos_token", "eos_token", "unk_token", "pad_token")}
    return PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"),
                                   **{key: value for key, value in specials.items() if value is not None})


def _rank_files(path: Path, config: dict[str, Any]) -> list[Path]:
    """The tiktoken rank file of a tokenizer dir: the one the config names, else any *.tiktoken."""
    if RANK_FILE_KEY in config:
        return [path / config[RANK_FILE_KEY]]
    return sorted(path.glob("*.tiktoken"))


def _token_text(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _load_tiktoken_dir(path: Path, config: dict[str, Any]) -> TiktokenTokenizer:
    import tiktoken

    added = {entry["content"]: int(token_id)
             for token_id, entry in config.get("added_tokens_decoder", {}).items()}
    rank_files = _rank_files(path, config)
    encoding_name = config.get("encoding_name") or DEFAULT_ENCODING
    if config.get("model_name") and not config.get("encoding_name"):
        encoding_name = tiktoken.model.encoding_name_for_model(config["model_name"])
    if rank_files:
        from tiktoken.load import load_tiktoken_bpe

        ranks = load_tiktoken_bpe(str(rank_files[0]))
        name, pat_str, base_specials = rank_files[0].stem, config.get(PAT_STR_KEY) or _named_pat_str(encoding_name), {}
    else:
        try:
            base = tiktoken.get_encoding(encoding_name)
        except Exception as error:  # tiktoken raises plain requests / OSError / ValueError here
            raise GenRepoError(
                f"{path} is a tiktoken tokenizer ({TIKTOKEN_WRAPPER_CLASS}) without a local *.tiktoken rank "
                f"file, and tiktoken could not load its '{encoding_name}' ranks ({error}). Put the "
                f"'{encoding_name}.tiktoken' file into {path} (or set TIKTOKEN_CACHE_DIR) and retry."
            ) from error
        ranks, name, pat_str, base_specials = base._mergeable_ranks, base.name, base._pat_str, base._special_tokens
    # the wrapper's added tokens (DBRX: <|pad|>, <|im_start|>, <|im_end|>) become tiktoken special tokens
    rank_ids = set(ranks.values())
    specials = {**base_specials, **{text: i for text, i in added.items() if i not in rank_ids}}
    encoding = tiktoken.Encoding(name=name, pat_str=pat_str, mergeable_ranks=ranks, special_tokens=specials)

    def token_id(key: str) -> int | None:
        text = _token_text(config.get(key))
        if text is None:
            return None
        if text in encoding._special_tokens:
            return int(encoding._special_tokens[text])
        ids = encoding.encode(text, allowed_special="all")
        return ids[0] if len(ids) == 1 else None

    eos = token_id("eos_token")
    if eos is None and "eos_token" not in config:
        eos = encoding._special_tokens.get("<|endoftext|>")  # the wrapper's default eos
    return TiktokenTokenizer(encoding=encoding, added_tokens=added, eos_token_id=eos,
                             pad_token_id=token_id("pad_token"), bos_token_id=token_id("bos_token"),
                             add_bos_token=bool(config.get("add_bos_token", False)),
                             add_eos_token=bool(config.get("add_eos_token", False)))


def _named_pat_str(encoding_name: str) -> str:
    """The split regex of a named tiktoken encoding, without downloading its ranks."""
    from tiktoken_ext import openai_public

    if encoding_name == "cl100k_base":
        return CL100K_PAT_STR
    if encoding_name in ("gpt2", "r50k_base", "p50k_base", "p50k_edit"):
        return str(openai_public.r50k_pat_str)
    raise ConfigError(f"no split pattern known for tiktoken encoding '{encoding_name}': add '{PAT_STR_KEY}' to "
                      f"tokenizer_config.json")


def save_tiktoken_tokenizer(encoding_or_ranks: Any, special_tokens: dict[str, int], out_dir: str | Path,
                            eos_token: str, pad_token: str | None = None, bos_token: str | None = None,
                            pat_str: str | None = None, encoding_name: str = DEFAULT_ENCODING) -> Path:
    """Write a DBRX-style tiktoken tokenizer dir (rank file + tokenizer_config.json), offline.

    `encoding_or_ranks` is a `tiktoken.Encoding` or a `{bytes: rank}` table; `special_tokens` maps the extra
    token texts to ids (`<|endoftext|>`, `<|pad|>`, ...). `pat_str` defaults to the Encoding's own, else to
    `encoding_name`'s. The config names `TiktokenTokenizerWrapper` like the real DBRX repos, plus our
    `tiktoken_rank_file` / `tiktoken_pat_str` keys so that `load_tokenizer` needs no network.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(encoding_or_ranks, dict):
        ranks: dict[bytes, int] = encoding_or_ranks
        specials = dict(special_tokens)
    else:
        ranks = encoding_or_ranks._mergeable_ranks
        specials = {**encoding_or_ranks._special_tokens, **special_tokens}
        pat_str = pat_str or encoding_or_ranks._pat_str
    for name in (eos_token, pad_token, bos_token):
        if name is not None and name not in specials:
            raise GenRepoError(f"special token {name!r} is not in special_tokens {sorted(specials)}")
    rank_file = f"{encoding_name}.tiktoken"
    lines = [f"{base64.b64encode(token).decode()} {rank}" for token, rank in sorted(ranks.items(), key=lambda kv: kv[1])]
    (out / rank_file).write_text("\n".join(lines) + "\n")
    config = {
        "tokenizer_class": TIKTOKEN_WRAPPER_CLASS,
        "auto_map": {"AutoTokenizer": ["tiktoken.TiktokenTokenizerWrapper", None]},
        "encoding_name": encoding_name,
        "add_bos_token": False,
        "add_eos_token": False,
        "eos_token": eos_token,
        "pad_token": pad_token,
        "bos_token": bos_token or eos_token,
        "unk_token": eos_token,
        "errors": "replace",
        "added_tokens_decoder": {str(token_id): {"content": text, "special": True, "lstrip": False,
                                                 "rstrip": False, "normalized": False, "single_word": False}
                                 for text, token_id in sorted(specials.items(), key=lambda kv: kv[1])},
        RANK_FILE_KEY: rank_file,
        PAT_STR_KEY: pat_str or _named_pat_str(encoding_name),
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
