"""`gen-repo eval`: the accuracy check of TensorRT-LLM's `examples/summarize.py`, for our engines.

It summarizes news articles with a served repository (gRPC, the `ensemble`), with an engine dir directly (the
pytorch engine's `Executor`; several ranks under `mpirun -n N gen-repo eval ...`, as `gen-repo run`) and/or
with transformers on the HF checkpoint, all on the same prompts and sampling settings. For each it reports
ROUGE-1/2/L/Lsum (the `rouge-score` package, F-measure x 100, aggregated like the `evaluate` library's rouge
metric that summarize.py uses: bootstrap with numpy seeded to 0, the middle value), total latency, output
tokens and tokens/s, and how far the engine outputs agree with transformers' (identical texts, identical
token ids, position-wise token match). `check_accuracy` fails unless ROUGE-1 is strictly above the threshold.

Prompts follow summarize.py's default `summarize` task: `<article> TL;DR: `, stripped, " n't" joined to the
word before, tokenized and cut to `max_input_len` tokens from the left (which drops " TL;DR:" from long
articles, exactly as summarize.py's `truncation=True` does). The served path sends text, so a cut prompt is
decoded to text and every path uses the ids that text encodes to (what the server's preprocessing sees).
"""

from __future__ import annotations

import functools
import json
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from generator.errors import GenRepoError
from generator.formats.dtypes import is_model_dtype, model_dtype, torch_dtype
from generator.formats.engine_dir import read_engine_dir

#: summarize.py's default `summarize` task appends this to each article.
DEFAULT_PROMPT_TEMPLATE = "{article} TL;DR: "
#: summarize.py's default `--max_input_length`.
DEFAULT_MAX_INPUT_LEN = 923
#: summarize.py's default `--output_len`.
DEFAULT_OUTPUT_LEN = 100
#: summarize.py's default `--tensorrt_llm_rouge1_threshold`.
DEFAULT_ROUGE_THRESHOLD = 15.0
#: The evaluation set shipped with gen-repo: short invented news items with reference summaries.
BUILTIN_DATASET = "eval_news.jsonl"
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
PATH_NAMES = {"served": "served (Triton ensemble)", "engine": "engine dir", "hf": "transformers"}


@dataclass(frozen=True)
class EvalSettings:
    """What to evaluate (any of url / engine_dir / hf_model_dir), on which data, with which sampling."""

    url: str | None = None                     # host:port of a served repository's gRPC endpoint
    model: str = "ensemble"                    # served model to ask
    engine_dir: Path | None = None
    hf_model_dir: Path | None = None
    tokenizer_dir: Path | None = None          # default: hf_model_dir
    dataset: str | None = None                 # local .jsonl/.json/.parquet, or a HF dataset name; None: built-in
    dataset_config: str | None = None          # HF dataset config (cnn_dailymail: 3.0.0 by default)
    dataset_split: str = "test"
    article_field: str = "article"
    summary_field: str = "highlights"
    max_samples: int | None = None
    max_input_len: int | None = None           # default: 923, capped at the engine's max_input_len
    output_len: int = DEFAULT_OUTPUT_LEN
    batch_size: int = 1                        # requests in flight together (served, engine)
    hf_batch_size: int = 1                     # transformers batch (padding changes its numerics, so 1)
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    add_special_tokens: bool = True
    temperature: float = 1.0
    top_k: int = 1                             # greedy unless top_k > 1 or top_p > 0 (TensorRT-LLM's rule)
    top_p: float = 0.0
    seed: int | None = None
    end_id: int | None = None                  # default: the tokenizer's eos
    use_stemmer: bool = True
    check_accuracy: bool = False
    rouge_threshold: float = DEFAULT_ROUGE_THRESHOLD
    device: str | None = None                  # engine and transformers device (default: cuda if present)
    hf_dtype: str = "auto"                     # auto: the engine's dtype when there is one, else the checkpoint's
    hf_device_map_auto: bool = False
    trust_remote_code: bool = False
    wait_s: float = 0.0
    timeout_s: float = 600.0
    progress: bool = True

    @property
    def greedy(self) -> bool:
        return self.top_k <= 1 and self.top_p <= 0.0


@dataclass(frozen=True)
class Sample:
    """One article and its reference summary."""

    article: str
    reference: str
    sample_id: str | None = None


@dataclass(frozen=True)
class Prompt:
    """The text a sample is asked as, the ids it encodes to, and whether it was cut to max_input_len."""

    text: str
    ids: list[int]
    truncated: bool


@dataclass
class PathResult:
    """One way of generating (served / engine / hf): outputs per sample, timing and scores."""

    name: str
    texts: list[str]
    token_ids: list[list[int]]
    latency_s: float
    rouge: dict[str, float] = field(default_factory=dict)

    @property
    def output_tokens(self) -> int:
        return sum(len(ids) for ids in self.token_ids)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.latency_s if self.latency_s > 0 else 0.0


@dataclass(frozen=True)
class Agreement:
    """How far two paths' outputs agree, sample by sample."""

    a: str
    b: str
    samples: int
    identical_texts: int
    identical_token_ids: int
    token_match: float          # position-wise equal tokens / tokens of the longer output, over all samples
    prefix_match: float         # tokens before the first difference / tokens of the longer output


@dataclass
class EvalReport:
    """Everything `gen-repo eval` prints: per-path scores, agreements and the accuracy check."""

    dataset: str
    samples: list[Sample]
    prompts: list[Prompt]
    settings: EvalSettings
    results: list[PathResult]
    agreements: list[Agreement]
    checked: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


# --- data -------------------------------------------------------------------------------------------------


def builtin_dataset_path() -> Path:
    """The evaluation set shipped in generator/data."""
    return Path(str(resources.files("generator") / "data" / BUILTIN_DATASET))


def load_samples(settings: EvalSettings) -> tuple[str, list[Sample]]:
    """The samples to evaluate and a name for where they came from; `GenRepoError` for unusable data."""
    source = settings.dataset
    if source is None:
        path: Path | None = builtin_dataset_path()
    else:
        path = Path(source).expanduser()
        if not path.exists():
            if path.suffix.lower() in DATA_SUFFIXES or source.startswith((".", "/", "~")):
                raise GenRepoError(f"dataset file {source} does not exist")
            path = None
    if path is not None:
        if path.is_dir():
            raise GenRepoError(f"dataset {path} is a directory: pass a .jsonl, .json or .parquet file")
        name, rows = str(path), _read_rows(path)
    else:
        assert source is not None
        name, rows = source, _hub_rows(source, settings.dataset_config, settings.dataset_split)
    if not rows:
        raise GenRepoError(f"dataset {name} has no samples")
    samples = []
    for index, row in enumerate(rows):
        if settings.max_samples is not None and index >= settings.max_samples:
            break
        samples.append(_sample(row, index, name, settings.article_field, settings.summary_field))
    if not samples:
        raise GenRepoError(f"--max-samples {settings.max_samples} leaves no samples")
    return name, samples


def _sample(row: Any, index: int, name: str, article_field: str, summary_field: str) -> Sample:
    if not isinstance(row, dict):
        raise GenRepoError(f"dataset {name}: sample {index} is a {type(row).__name__}, not an object with fields")
    values = []
    for key, flag in ((article_field, "--article-field"), (summary_field, "--summary-field")):
        if key not in row:
            fields = ", ".join(sorted(str(k) for k in row)) or "none"
            raise GenRepoError(f"dataset {name}: sample {index} has no field {key!r} (its fields: {fields}; "
                               f"choose one with {flag})")
        value = row[key]
        if not isinstance(value, str) or not value.strip():
            raise GenRepoError(f"dataset {name}: sample {index} field {key!r} is not a non-empty string")
        values.append(value)
    sample_id = row.get("id")
    return Sample(values[0], values[1], None if sample_id is None else str(sample_id))


def _read_rows(path: Path) -> list[Any]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise GenRepoError(f"dataset {path} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    if not text.strip():
        raise GenRepoError(f"dataset {path} is empty")
    if suffix == ".jsonl":
        return _jsonl_rows(path, text)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        if suffix != ".json" or error.msg == "Extra data":  # JSON lines under another name
            return _jsonl_rows(path, text)
        raise GenRepoError(f"dataset {path} is not valid JSON ({error.msg} at line {error.lineno} column "
                           f"{error.colno})") from None
    if isinstance(data, dict):
        columns = [value for value in data.values() if isinstance(value, list)]
        if columns and all(isinstance(v, list) and len(v) == len(columns[0]) for v in data.values()):
            return [dict(zip(data, row, strict=True)) for row in zip(*data.values(), strict=True)]
        for key in ("data", "rows", "samples"):
            if isinstance(data.get(key), list):
                return list(data[key])
        raise GenRepoError(f"dataset {path}: expected a list of objects (or an object of equal-length columns)")
    if not isinstance(data, list):
        raise GenRepoError(f"dataset {path}: expected a list of objects, got a {type(data).__name__}")
    return data


def _jsonl_rows(path: Path, text: str) -> list[Any]:
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise GenRepoError(f"dataset {path} line {number} is not valid JSON ({error.msg} at column "
                               f"{error.colno})") from None
    return rows


def _read_parquet(path: Path) -> list[Any]:
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise GenRepoError("reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        return list(parquet.read_table(path).to_pylist())
    except Exception as error:  # pyarrow raises ArrowInvalid / OSError subclasses for bad files
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise GenRepoError(f"dataset {path} is not a readable Parquet file ({first})") from None


def _hub_rows(name: str, config: str | None, split: str) -> list[Any]:
    try:
        import datasets
    except ImportError:
        raise GenRepoError(f"{name!r} is not a local file, and loading a Hugging Face dataset needs the `datasets` "
                           "package (pip install 'gen-repo[datasets]')") from None
    if config is None and name.rstrip("/").endswith("cnn_dailymail"):
        config = "3.0.0"  # the version summarize.py evaluates
    try:
        data = datasets.load_dataset(name, config, split=split)
    except Exception as error:  # offline, unknown name, bad split: all one line for the user
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise GenRepoError(f"cannot load dataset {name!r} (split {split!r}) from the Hugging Face hub: "
                           f"{first}") from None
    return [dict(row) for row in data]


# --- prompts ----------------------------------------------------------------------------------------------


def prompt_text(article: str, template: str) -> str:
    """summarize.py's prompt: the template around the article, stripped, with " n't" joined to its word."""
    return template.replace("{article}", article).strip().replace(" n't", "n't")


def build_prompts(samples: list[Sample], tokenizer: Any, max_input_len: int, template: str,
                  add_special_tokens: bool = True) -> list[Prompt]:
    """Each sample's prompt, cut to at most `max_input_len` tokens (keeping the start)."""
    if "{article}" not in template:
        raise GenRepoError("--prompt-template must contain {article}")
    if max_input_len < 1:
        raise GenRepoError("--max-input-len must be at least 1")
    prompts = []
    for sample in samples:
        text = prompt_text(sample.article, template)
        ids = list(tokenizer.encode(text, add_special_tokens=add_special_tokens))
        truncated = len(ids) > max_input_len
        keep = max_input_len
        while len(ids) > max_input_len and keep > 0:
            # The served path sends text: cut the ids, go back to text, and use what that text encodes to
            # (re-encoding a cut word can give other, rarely more, tokens: then cut one more).
            text = tokenizer.decode(ids[:keep], skip_special_tokens=True)
            new_ids = list(tokenizer.encode(text, add_special_tokens=add_special_tokens))
            if len(new_ids) <= max_input_len:
                ids = new_ids
                break
            keep -= 1
        if not ids:
            raise GenRepoError(f"sample {sample.sample_id or '?'} gives an empty prompt")
        prompts.append(Prompt(text, ids, truncated))
    return prompts


def _load_eval_tokenizer(path: Path, trust_remote_code: bool) -> Any:
    from generator.formats.tokenizer import load_tokenizer

    return load_tokenizer(path, trust_remote_code=trust_remote_code)


# --- scoring ----------------------------------------------------------------------------------------------


def rouge_scores(predictions: list[str], references: list[str], use_stemmer: bool = True) -> dict[str, float]:
    """ROUGE-1/2/L/Lsum F-measures x 100, aggregated as the `evaluate` rouge metric does (bootstrap, mid)."""
    import numpy as np
    from rouge_score import rouge_scorer, scoring

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
    aggregator = scoring.BootstrapAggregator()
    for prediction, reference in zip(predictions, references, strict=True):
        aggregator.add_scores(scorer.score(reference, prediction))
    # the bootstrap draws from numpy's global generator; summarize.py seeds it with 0 before each compute
    state = np.random.get_state()
    np.random.seed(0)
    try:
        result = aggregator.aggregate()
    finally:
        np.random.set_state(state)
    return {key: float(result[key].mid.fmeasure * 100) for key in ROUGE_TYPES}


def agreement(a: PathResult, b: PathResult) -> Agreement:
    """Identical texts / token ids and the share of equal tokens between two paths' outputs."""
    matched = prefix = total = 0
    for ids_a, ids_b in zip(a.token_ids, b.token_ids, strict=True):
        matched += sum(1 for x, y in zip(ids_a, ids_b, strict=False) if x == y)
        common = 0
        for x, y in zip(ids_a, ids_b, strict=False):
            if x != y:
                break
            common += 1
        prefix += common
        total += max(len(ids_a), len(ids_b))
    return Agreement(
        a=a.name, b=b.name, samples=len(a.texts),
        identical_texts=sum(1 for x, y in zip(a.texts, b.texts, strict=True) if x == y),
        identical_token_ids=sum(1 for x, y in zip(a.token_ids, b.token_ids, strict=True) if x == y),
        token_match=matched / total if total else 1.0, prefix_match=prefix / total if total else 1.0)


# --- the three paths --------------------------------------------------------------------------------------


@contextmanager
def _progress(name: str, total: int, enabled: bool) -> Iterator[Any]:
    from tqdm import tqdm

    with tqdm(total=total, desc=name, unit="sample", file=sys.stderr, disable=not enabled, leave=False) as bar:
        yield bar


def _batches(count: int, size: int) -> Iterator[range]:
    for start in range(0, count, size):
        yield range(start, min(count, start + size))


def _trim(ids: list[int], end_id: int | None) -> list[int]:
    """Generated ids up to (without) the first end_id, as the engines report them."""
    if end_id is not None and end_id in ids:
        return ids[:ids.index(end_id)]
    return ids


def run_served(prompts: list[Prompt], settings: EvalSettings, tokenizer: Any, end_id: int | None,
               pad_id: int | None) -> PathResult:
    """Ask the served model (gRPC, streaming off), `batch_size` requests at a time."""
    import numpy as np

    from generator.serving.client import build_grpc_inputs, model_inputs, stream_grpc, wait_for_model

    assert settings.url is not None
    if settings.wait_s > 0:
        wait_for_model(settings.url, "grpc", settings.model, settings.wait_s)
    input_types = model_inputs(settings.url, settings.model)
    texts = [""] * len(prompts)
    token_ids: list[list[int]] = [[] for _ in prompts]

    def ask(index: int) -> None:
        values: dict[str, Any] = {
            "text_input": prompts[index].text, "max_tokens": settings.output_len, "stream": False,
            "exclude_input_in_output": True, "temperature": settings.temperature, "top_k": settings.top_k,
            "top_p": settings.top_p}
        if end_id is not None:
            values["end_id"] = end_id
        if pad_id is not None:
            values["pad_id"] = pad_id
        if settings.seed is not None:
            values["seed"] = settings.seed
        # optional inputs the model lacks (another backend version) are left to its defaults
        optional = ("end_id", "pad_id", "temperature", "top_k", "top_p", "seed", "exclude_input_in_output",
                    "stream")
        values = {name: value for name, value in values.items()
                  if name not in optional or name in input_types
                  or (name == "seed" and "random_seed" in input_types)}
        inputs = build_grpc_inputs(values, input_types, settings.model)
        pieces: list[str] = []
        ids: list[int] | None = None
        for result in stream_grpc(settings.url or "", settings.model, inputs, settings.timeout_s):
            text = result.as_numpy("text_output")
            if text is None:  # the empty final response
                continue
            pieces += [item.decode("utf-8", errors="replace") if isinstance(item, bytes) else str(item)
                       for item in np.asarray(text).reshape(-1)]
            output_ids = result.as_numpy("output_ids")
            if output_ids is not None:
                row = np.asarray(output_ids).reshape(-1)
                lengths = result.as_numpy("sequence_length")
                length = int(np.asarray(lengths).reshape(-1)[0]) if lengths is not None else row.size
                ids = (ids or []) + [int(t) for t in row[:length]]
        texts[index] = "".join(pieces)
        if ids is None:  # a model without output_ids: count the tokens of the text
            ids = list(tokenizer.encode(texts[index], add_special_tokens=False))
        token_ids[index] = _trim(ids, end_id)

    latency = 0.0
    with _progress("served", len(prompts), settings.progress) as bar, \
            ThreadPoolExecutor(max_workers=max(1, settings.batch_size)) as pool:
        for batch in _batches(len(prompts), max(1, settings.batch_size)):
            start = time.perf_counter()
            for future in [pool.submit(ask, index) for index in batch]:
                future.result()
            latency += time.perf_counter() - start
            bar.update(len(batch))
    return PathResult("served", texts, token_ids, latency)


def run_engine(prompts: list[Prompt], settings: EvalSettings, tokenizer: Any, end_id: int | None,
               pad_id: int | None) -> PathResult:
    """Generate with the engine dir in this process (rank 0), `batch_size` requests at a time."""
    from generator.engine import Executor, GenerationRequest, SamplingConfig

    assert settings.engine_dir is not None
    sampling = SamplingConfig(max_new_tokens=settings.output_len, end_id=end_id, pad_id=pad_id,
                              temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
                              seed=settings.seed)
    token_ids: list[list[int]] = [[] for _ in prompts]
    done = threading.Semaphore(0)
    errors: list[str] = []

    def on_result(result: Any, index: int) -> None:  # called from the step-loop thread, once per request
        if result.error:
            errors.append(result.error)
        token_ids[index] = list(result.token_ids)
        done.release()

    latency = 0.0
    with Executor(settings.engine_dir, device=settings.device) as executor, \
            _progress("engine", len(prompts), settings.progress) as bar:
        for batch in _batches(len(prompts), max(1, settings.batch_size)):
            start = time.perf_counter()
            for index in batch:
                try:
                    executor.enqueue(GenerationRequest(prompts[index].ids, sampling),
                                     functools.partial(on_result, index=index))
                except ValueError as error:
                    raise GenRepoError(f"the engine refuses sample {index}: {error} (lower --max-input-len "
                                       "or --output-len)") from None
            for _ in batch:
                done.acquire()
            latency += time.perf_counter() - start
            if errors:
                raise GenRepoError(f"the engine failed: {errors[0]}")
            bar.update(len(batch))
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in token_ids]
    return PathResult("engine", texts, token_ids, latency)


def _hf_dtype(settings: EvalSettings) -> Any:
    name = settings.hf_dtype
    if name == "auto" and settings.engine_dir is not None:
        return model_dtype(read_engine_dir(settings.engine_dir).dtype).torch
    if name == "auto":
        return "auto"
    if not is_model_dtype(name):
        raise GenRepoError(f"unknown --hf-dtype {settings.hf_dtype!r}")
    return torch_dtype(name)


def run_hf(prompts: list[Prompt], settings: EvalSettings, tokenizer: Any, end_id: int | None,
           pad_id: int | None) -> PathResult:
    """Generate with transformers on the HF checkpoint, `hf_batch_size` prompts per `generate` (left-padded)."""
    import torch
    from transformers import AutoModelForCausalLM

    assert settings.hf_model_dir is not None
    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    options: dict[str, Any] = {"dtype": _hf_dtype(settings), "trust_remote_code": settings.trust_remote_code}
    if settings.hf_device_map_auto:
        options["device_map"] = "auto"
    try:
        model = AutoModelForCausalLM.from_pretrained(str(settings.hf_model_dir), **options).eval()
    except (OSError, ValueError, ImportError) as error:  # no weights, unknown architecture, no accelerate
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise GenRepoError(f"transformers cannot load {settings.hf_model_dir}: {first}") from None
    if not settings.hf_device_map_auto:
        model.to(device)
    first_device = next(model.parameters()).device
    sampling: dict[str, Any] = {"do_sample": False}
    if not settings.greedy:
        # TensorRT-LLM's "off" values (top_k 0, top_p 0) are transformers' 0 and 1.0
        sampling = {"do_sample": True, "temperature": settings.temperature, "top_k": max(0, settings.top_k),
                    "top_p": settings.top_p if settings.top_p > 0 else 1.0}
        torch.manual_seed(settings.seed or 0)
    pad = pad_id if pad_id is not None else (end_id if end_id is not None else 0)
    token_ids: list[list[int]] = [[] for _ in prompts]
    latency = 0.0
    with _progress("hf", len(prompts), settings.progress) as bar, torch.no_grad():
        for batch in _batches(len(prompts), max(1, settings.hf_batch_size)):
            width = max(len(prompts[index].ids) for index in batch)
            rows = [[pad] * (width - len(prompts[i].ids)) + prompts[i].ids for i in batch]
            masks = [[0] * (width - len(prompts[i].ids)) + [1] * len(prompts[i].ids) for i in batch]
            input_ids = torch.tensor(rows, device=first_device)
            start = time.perf_counter()
            output = model.generate(input_ids, attention_mask=torch.tensor(masks, device=first_device),
                                    max_new_tokens=settings.output_len, eos_token_id=end_id, pad_token_id=pad,
                                    **sampling)
            if first_device.type == "cuda":
                torch.cuda.synchronize(first_device)
            latency += time.perf_counter() - start
            for row, index in enumerate(batch):
                token_ids[index] = _trim(output[row, width:].tolist(), end_id)
            bar.update(len(batch))
    del model
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in token_ids]
    return PathResult("hf", texts, token_ids, latency)


# --- the command ------------------------------------------------------------------------------------------


def _check_settings(settings: EvalSettings) -> None:
    if not (settings.url or settings.engine_dir or settings.hf_model_dir):
        raise GenRepoError("nothing to evaluate: give --url, --engine-dir and/or --hf-model-dir")
    if settings.tokenizer_dir is None and settings.hf_model_dir is None:
        raise GenRepoError("eval needs a tokenizer: pass --tokenizer-dir (or --hf-model-dir)")
    for name, value in (("--output-len", settings.output_len), ("--batch-size", settings.batch_size),
                        ("--hf-batch-size", settings.hf_batch_size)):
        if value < 1:
            raise GenRepoError(f"{name} must be at least 1")
    if settings.max_samples is not None and settings.max_samples < 1:
        raise GenRepoError("--max-samples must be at least 1")
    if "{article}" not in settings.prompt_template:
        raise GenRepoError("--prompt-template must contain {article}")


def evaluate(settings: EvalSettings) -> EvalReport | None:
    """Run every requested path on the same prompts and score them; None on ranks > 0 of an mpirun launch
    (they follow rank 0's engine and return when it shuts down)."""
    _check_settings(settings)
    engine_max_input = None
    if settings.engine_dir is not None:
        from generator.engine.ranks import join_engine_ranks

        config = join_engine_ranks(settings.engine_dir, settings.device, "eval")
        if config is None:
            return None
        engine_max_input = config.max_input_len
    else:
        from generator.engine.rank_env import process_info

        if process_info().rank != 0:  # launched under mpirun without an engine: rank 0 does all the work
            return None
    dataset, samples = load_samples(settings)
    tokenizer = _load_eval_tokenizer(settings.tokenizer_dir or settings.hf_model_dir,  # type: ignore[arg-type]
                                     settings.trust_remote_code)
    max_input_len = settings.max_input_len
    if max_input_len is None:
        max_input_len = min(DEFAULT_MAX_INPUT_LEN, engine_max_input or DEFAULT_MAX_INPUT_LEN)
    prompts = build_prompts(samples, tokenizer, max_input_len, settings.prompt_template,
                            settings.add_special_tokens)
    end_id = settings.end_id if settings.end_id is not None else tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_id
    results = []
    if settings.url:
        results.append(run_served(prompts, settings, tokenizer, end_id, pad_id))
    if settings.engine_dir is not None:
        results.append(run_engine(prompts, settings, tokenizer, end_id, pad_id))
    if settings.hf_model_dir is not None:
        results.append(run_hf(prompts, settings, tokenizer, end_id, pad_id))
    references = [sample.reference for sample in samples]
    for result in results:
        result.rouge = rouge_scores(result.texts, references, settings.use_stemmer)
    by_name = {result.name: result for result in results}
    agreements = [agreement(by_name[a], by_name[b])
                  for a, b in (("served", "hf"), ("engine", "hf"), ("served", "engine"))
                  if a in by_name and b in by_name]
    report = EvalReport(dataset, samples, prompts, settings, results, agreements)
    if settings.check_accuracy:
        # summarize.py checks the engine; with only transformers asked, check transformers
        report.checked = [r.name for r in results if r.name != "hf"] or ["hf"]
        for name in report.checked:
            rouge1 = by_name[name].rouge["rouge1"]
            if not rouge1 > settings.rouge_threshold:
                report.failures.append(f"{name}: rouge1 {rouge1:.4f} is not above the threshold "
                                       f"{settings.rouge_threshold}")
    return report


def report_dict(report: EvalReport) -> dict[str, Any]:
    """The report as JSON-ready data (`gen-repo eval --json`)."""
    settings = {key: (str(value) if isinstance(value, Path) else value)
                for key, value in asdict(report.settings).items()}
    results = {r.name: {**{key: round(value, 4) for key, value in r.rouge.items()},
                        "latency_s": round(r.latency_s, 4), "output_tokens": r.output_tokens,
                        "tokens_per_s": round(r.tokens_per_s, 2)} for r in report.results}
    outputs = []
    for index, (sample, prompt) in enumerate(zip(report.samples, report.prompts, strict=True)):
        entry: dict[str, Any] = {"index": index, "id": sample.sample_id, "reference": sample.reference,
                                 "prompt_tokens": len(prompt.ids), "truncated": prompt.truncated}
        for result in report.results:
            entry[result.name] = result.texts[index]
            entry[f"{result.name}_token_ids"] = result.token_ids[index]
        outputs.append(entry)
    check = None
    if report.settings.check_accuracy:
        check = {"metric": "rouge1", "threshold": report.settings.rouge_threshold, "checked": report.checked,
                 "passed": report.passed, "failures": report.failures}
    return {"dataset": report.dataset, "samples": len(report.samples), "settings": settings, "results": results,
            "agreement": [asdict(a) for a in report.agreements], "check": check, "outputs": outputs}


def format_report(report: EvalReport) -> str:
    """The table printed at the end of `gen-repo eval`."""
    s = report.settings
    mode = "greedy" if s.greedy else f"sampling (temperature {s.temperature}, top_k {s.top_k}, top_p {s.top_p})"
    truncated = sum(1 for p in report.prompts if p.truncated)
    lines = [f"{len(report.samples)} samples from {report.dataset} ({truncated} cut to the input limit), "
             f"output_len {s.output_len}, {mode}, ROUGE {'with' if s.use_stemmer else 'without'} stemming", ""]
    header = ["path", "ROUGE-1", "ROUGE-2", "ROUGE-L", "ROUGE-Lsum", "latency s", "output tokens", "tokens/s"]
    rows = [[PATH_NAMES[r.name], *(f"{r.rouge[k]:.2f}" for k in ROUGE_TYPES), f"{r.latency_s:.2f}",
             str(r.output_tokens), f"{r.tokens_per_s:.1f}"] for r in report.results]
    lines += _table(header, rows)
    if report.agreements:
        lines.append("")
        header = ["agreement", "identical texts", "identical tokens", "token match", "prefix match"]
        rows = [[f"{a.a} vs {a.b}", f"{a.identical_texts}/{a.samples}", f"{a.identical_token_ids}/{a.samples}",
                 f"{a.token_match * 100:.2f}%", f"{a.prefix_match * 100:.2f}%"] for a in report.agreements]
        lines += _table(header, rows)
    if s.check_accuracy:
        lines.append("")
        lines += [f"[FAILED] {failure}" for failure in report.failures]
        if report.passed:
            lines.append(f"[PASSED] rouge1 above {s.rouge_threshold} for {', '.join(report.checked)}")
    return "\n".join(lines)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return ["  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row))
            for row in [header, *rows]]
