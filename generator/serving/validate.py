"""Offline checks of a Triton model repository of the tensorrtllm_backend inflight_batcher_llm shape.

What Triton only reports at load time (or at the first request) is found here without a server: configs that do
not parse, unfilled `${...}` / `{{ ... }}` placeholders, ensemble maps naming tensors that do not exist or whose
dtypes differ, missing step models, inconsistent max_batch_size, a non-decoupled generation model when
streaming is wanted, engine limits exceeded, missing tokenizer / engine files, and GPU count vs world size.

A repository may hold several models side by side (render's `model_name_prefix`): every `<prefix>ensemble`
makes a group `<prefix>preprocessing`, `<prefix>tensorrt_llm`, ... whose preprocessing / postprocessing are
the ones its ensemble steps name (possibly shared with other groups), and each group is checked on its own.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from generator.errors import GenRepoError
from generator.formats.engine_dir import EngineDir, read_engine_dir
from generator.formats.safetensors import read_safetensors_header
from generator.serving import contract, pbtxt

ROLES = tuple(contract.MODELS)  # preprocessing, tensorrt_llm, postprocessing, ensemble, tensorrt_llm_bls
CORE_MODELS = tuple(role for role in ROLES if role != "tensorrt_llm_bls")
#: BLS parameters naming the models it calls, and the role of each
_BLS_MODEL_PARAMETERS = {"tensorrt_llm_model_name": "tensorrt_llm", "preprocessing_model_name": "preprocessing",
                         "postprocessing_model_name": "postprocessing"}
STREAMING_MODELS = ("tensorrt_llm", "tensorrt_llm_bls")
BATCHING_STRATEGIES = ("inflight_fused_batching", "inflight_batching", "V1", "v1")
_PLACEHOLDER = re.compile(r"\$\{[^}]*\}|\{\{[^}]*\}\}")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# Backends a Triton model may name (NVIDIA's containers and the python-based ones); anything else fails to load.
KNOWN_BACKENDS = ("python", "tensorrtllm", "onnxruntime", "pytorch", "tensorflow", "tensorrt", "openvino", "fil",
                  "dali", "vllm", "identity", "repeat", "square")
KNOWN_PLATFORMS = ("ensemble", "tensorrt_plan", "onnxruntime_onnx", "pytorch_libtorch", "tensorflow_savedmodel",
                   "tensorflow_graphdef")
# HF config keys of the same quantity, across model families
_HF_KEYS = {"vocab_size": ("vocab_size",), "hidden_size": ("hidden_size", "d_model", "n_embd"),
            "num_hidden_layers": ("num_hidden_layers", "n_layers", "n_layer")}


@dataclass(frozen=True)
class Problem:
    """One defect: the file it is in, the field (dotted path) and what is wrong."""

    file: str
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.field}: {self.message}"


def format_problems(problems: list[Problem]) -> str:
    """One problem per line."""
    return "\n".join(f"  {problem}" for problem in problems)


@dataclass
class _Model:
    name: str
    config_file: Path
    config: Any  # model_config_pb2.ModelConfig

    def inputs(self) -> dict[str, Any]:
        return {tensor.name: tensor for tensor in self.config.input}

    def outputs(self) -> dict[str, Any]:
        return {tensor.name: tensor for tensor in self.config.output}

    def parameter(self, key: str) -> str | None:
        return pbtxt.parameter(self.config, key)


class _Checker:
    def __init__(self, root: Path, streaming: bool, deep: bool = False) -> None:
        self.root = root
        self.streaming = streaming
        self.deep = deep
        self.problems: list[Problem] = []
        self.models: dict[str, _Model] = {}
        # the group being checked: role ("preprocessing", ..., "tensorrt_llm_bls") -> model name
        self.names: dict[str, str] = {role: role for role in ROLES}

    def model(self, role: str) -> _Model | None:
        """The model playing `role` in the group being checked."""
        return self.models.get(self.names[role])

    def groups(self) -> list[dict[str, str]]:
        """One role -> name map per `<prefix>ensemble` (the unprefixed names when there is no ensemble)."""
        ensembles = sorted(name for name, model in self.models.items()
                           if name.endswith("ensemble") and model.config.platform == "ensemble")
        groups = []
        for ensemble in ensembles or ["ensemble"]:
            prefix = ensemble[:-len("ensemble")]
            names = {role: prefix + role for role in ROLES}
            steps = self.models[ensemble].config.ensemble_scheduling.step if ensemble in self.models else []
            for step in steps:  # shared preprocessing / postprocessing: the ones the steps name
                for role in ("preprocessing", "postprocessing"):
                    if step.model_name.endswith(role):
                        names[role] = step.model_name
            groups.append(names)
        return groups

    def add(self, file: Path | str, field: str, message: str) -> None:
        path = Path(file)
        shown = str(path.relative_to(self.root)) if path.is_absolute() and path.is_relative_to(self.root) else str(path)
        self.problems.append(Problem(shown, field, message))

    # parsing ----------------------------------------------------------------------------------------------
    def load_models(self) -> None:
        """Parse every */config.pbtxt; report placeholders and syntax errors."""
        for config_file in sorted(self.root.glob("*/config.pbtxt")):
            text = config_file.read_text()
            for line_number, line in enumerate(text.splitlines(), 1):
                if line.lstrip().startswith("#"):
                    continue
                for match in _PLACEHOLDER.finditer(line):
                    self.add(config_file, _field_of_line(line, line_number),
                             f"unfilled placeholder {match.group(0)}")
            try:
                config = pbtxt.parse_model_config(text, config_file)
            except pbtxt.PbtxtError as error:
                self.add(config_file, "(syntax)", f"does not parse as a Triton ModelConfig: {error.detail}")
                continue
            name = config_file.parent.name
            if config.name and config.name != name:
                self.add(config_file, "name", f"'{config.name}' differs from its directory name '{name}'")
            self.models[name] = _Model(name, config_file, config)

    # checks -----------------------------------------------------------------------------------------------
    def check_present(self) -> None:
        """The core models, their version dirs and model.py files, and max_batch_size > 0."""
        for role in CORE_MODELS:
            name = self.names[role]
            if name not in self.models and not (self.root / name / "config.pbtxt").exists():
                self.add(self.root / name / "config.pbtxt", "(file)", f"model '{name}' is missing")

    def check_each_model(self) -> None:
        """Every model (of any group): its version dir, model.py for python models, max_batch_size > 0."""
        for name, model in self.models.items():
            version_dir = self.root / name / "1"
            if not version_dir.is_dir():
                self.add(version_dir, "(dir)", "version directory 1/ is missing")
            elif model.config.backend == "python" and not (version_dir / "model.py").is_file():
                self.add(version_dir / "model.py", "(file)", "python backend model without 1/model.py")
            if model.config.max_batch_size <= 0:
                self.add(model.config_file, "max_batch_size",
                         f"is {model.config.max_batch_size}; the inflight_batcher_llm contract needs > 0")
            self.check_backend(model)
            for index, count in pbtxt.instance_counts(model.config_file.read_text()):
                if count <= 0:
                    self.add(model.config_file, f"instance_group[{index}].count",
                             f"is {count}: the model would have no instance to run requests")
            model_py = version_dir / "model.py"
            if model.config.backend == "python" and model_py.is_file():
                try:
                    compile(model_py.read_bytes(), str(model_py), "exec")
                except (SyntaxError, ValueError) as error:
                    line = getattr(error, "lineno", None)
                    self.add(model_py, "(syntax)", f"does not compile{f' (line {line})' if line else ''}: "
                             f"{getattr(error, 'msg', error)}")

    def check_backend(self, model: _Model) -> None:
        """A backend (or platform) Triton knows."""
        backend, platform = model.config.backend, model.config.platform
        if not backend and not platform:
            self.add(model.config_file, "backend", "neither backend nor platform is set (auto-complete is off in "
                     "what gen-repo serve starts)")
        elif backend and backend not in KNOWN_BACKENDS:
            self.add(model.config_file, "backend", f"unknown backend '{backend}' (known: {', '.join(KNOWN_BACKENDS)})")
        elif not backend and platform not in KNOWN_PLATFORMS:
            self.add(model.config_file, "platform", f"unknown platform '{platform}'")

    def check_strays(self) -> None:
        """Every directory of the repository is a model: one without config.pbtxt fails the server's start."""
        for entry in sorted(self.root.iterdir()):
            if entry.is_dir() and not entry.name.startswith(".") and not (entry / "config.pbtxt").is_file():
                self.add(entry, "(dir)", "directory without config.pbtxt: tritonserver fails to load it (remove it "
                         "or move it out of the repository)")

    def check_streaming(self) -> None:
        """Decoupled generation models where streaming is wanted; BLS and tensorrt_llm agree."""
        core = self.model("tensorrt_llm")
        bls = self.model("tensorrt_llm_bls")
        if self.streaming:
            for model in (self.model(role) for role in STREAMING_MODELS):
                if model is not None and not model.config.model_transaction_policy.decoupled:
                    self.add(model.config_file, "model_transaction_policy.decoupled",
                             "must be true: streaming (stream=true) and batched requests need a decoupled model")
        if core is not None and bls is not None and (bls.config.model_transaction_policy.decoupled
                                                     and not core.config.model_transaction_policy.decoupled):
            self.add(bls.config_file, "model_transaction_policy.decoupled",
                     "is true but tensorrt_llm is not decoupled; the BLS streams from tensorrt_llm")

    def check_contract(self) -> None:
        """Each model declares the required inputs of the I/O contract, and the contract's tensors it declares
        have the contract's dtype (those the engine decides, such as logits, are checked elsewhere)."""
        for role, expected in contract.MODELS.items():
            model = self.model(role)
            if model is None:
                continue
            for kind, declared, tensors in (("input", model.inputs(), expected.inputs),
                                            ("output", model.outputs(), expected.outputs)):
                for tensor in tensors:
                    found = declared.get(tensor.name)
                    if found is None:
                        if kind == "input" and not tensor.optional:
                            self.add(model.config_file, f"input[{tensor.name}]", f"required input of the "
                                     f"{role} contract is missing")
                    elif tensor.data_type not in (contract.LOGITS, contract.PROMPT, contract.ENCODER) and \
                            _dtype(found.data_type) != tensor.triton_type:
                        self.add(model.config_file, f"{kind}[{tensor.name}]", f"is {_dtype(found.data_type)}; the "
                                 f"{role} contract says {tensor.triton_type}")

    def check_ensemble(self) -> None:
        """Ensemble steps exist and every map names real tensors of matching dtype."""
        ensemble = self.model("ensemble")
        if ensemble is None:
            return
        file = ensemble.config_file
        if ensemble.config.platform != "ensemble":
            self.add(file, "platform", f"is '{ensemble.config.platform}', expected 'ensemble'")
        # tensor name -> (data type, who provides it)
        available = {name: (tensor.data_type, "ensemble input") for name, tensor in ensemble.inputs().items()}
        produced: set[str] = set()
        ensemble_outputs = set(ensemble.outputs())
        for index, step in enumerate(ensemble.config.ensemble_scheduling.step):
            where = f"ensemble_scheduling.step[{index}]"
            model = self.models.get(step.model_name)
            if model is None:
                self.add(file, f"{where}.model_name", f"step model '{step.model_name}' is not in the repository")
                continue
            if ensemble.config.max_batch_size > model.config.max_batch_size:
                self.add(file, "max_batch_size", f"{ensemble.config.max_batch_size} exceeds step model "
                         f"'{model.name}' max_batch_size {model.config.max_batch_size}")
            step_inputs = model.inputs()
            for key, value in step.input_map.items():
                if key not in step_inputs:
                    self.add(file, f"{where}.input_map[{key}]", f"'{model.name}' has no input '{key}'")
                    continue
                if value not in available:
                    self.add(file, f"{where}.input_map[{key}]",
                             f"'{value}' is neither an ensemble input nor an output of an earlier step")
                    continue
                if value in ensemble_outputs:
                    # Triton drops an ensemble output the client did not request, so this step would never run
                    # for a client naming other outputs: the request ends without a response
                    self.add(file, f"{where}.input_map[{key}]", f"'{value}' is also an ensemble output; feed the "
                             f"step an internal tensor instead")
                dtype, source = available[value]
                if dtype != step_inputs[key].data_type:
                    self.add(file, f"{where}.input_map[{key}]", f"{source} '{value}' is {_dtype(dtype)} but "
                             f"'{model.name}' input '{key}' is {_dtype(step_inputs[key].data_type)}")
            for key, tensor in step_inputs.items():
                if not tensor.optional and key not in step.input_map:
                    self.add(file, f"{where}.input_map", f"required input '{key}' of '{model.name}' is not mapped")
            step_outputs = model.outputs()
            for key, value in step.output_map.items():
                if key not in step_outputs:
                    self.add(file, f"{where}.output_map[{key}]", f"'{model.name}' has no output '{key}'")
                    continue
                available[value] = (step_outputs[key].data_type, f"'{model.name}' output '{key}'")
                produced.add(value)
        seen: set[str] = set()
        for name, tensor in ensemble.outputs().items():
            if name not in produced:
                self.add(file, f"output[{name}]", "no step's output_map produces it")
            elif available[name][0] != tensor.data_type:
                self.add(file, f"output[{name}]", f"is {_dtype(tensor.data_type)} but {available[name][1]} is "
                         f"{_dtype(available[name][0])}")
        for tensor in ensemble.config.output:
            if tensor.name in seen:
                self.add(file, f"output[{tensor.name}]", "declared twice")
            seen.add(tensor.name)

    def check_tokenizers(self) -> None:
        """tokenizer_dir parameters point at absolute dirs holding tokenizer files."""
        for role in ("preprocessing", "postprocessing", "tensorrt_llm"):
            model = self.model(role)
            if model is None:
                continue
            tokenizer_dir = model.parameter("tokenizer_dir")
            if not tokenizer_dir:
                if role != "tensorrt_llm":
                    self.add(model.config_file, "parameters[tokenizer_dir]", "is not set")
                continue
            path = Path(tokenizer_dir)
            if not path.is_absolute():
                self.add(model.config_file, "parameters[tokenizer_dir]", f"'{tokenizer_dir}' is not absolute")
            if not path.is_dir():
                self.add(model.config_file, "parameters[tokenizer_dir]", f"directory '{tokenizer_dir}' does not exist")
            elif not any((path / f).is_file() for f in _TOKENIZER_FILES) and not list(path.glob("*.tiktoken")):
                self.add(model.config_file, "parameters[tokenizer_dir]",
                         f"'{tokenizer_dir}' holds no tokenizer files ({', '.join(_TOKENIZER_FILES)}, *.tiktoken)")

    def check_engine(self) -> None:
        """The engine dir of tensorrt_llm: files per rank, backend, limits, GPUs per instance."""
        core = self.model("tensorrt_llm")
        if core is None:
            return
        file = core.config_file
        engine_dir = core.parameter("gpt_model_path")
        if not engine_dir:
            self.add(file, "parameters[gpt_model_path]", "is not set")
            return
        engine = Path(engine_dir)
        if not engine.is_absolute():
            self.add(file, "parameters[gpt_model_path]", f"'{engine_dir}' is not absolute")
        config_file = engine / "config.json"
        if not config_file.is_file():
            self.add(file, "parameters[gpt_model_path]", f"'{engine_dir}' has no config.json")
            return
        try:
            info = read_engine_dir(engine)
        except GenRepoError as error:
            self.add(config_file, "(json)", str(error))
            return
        world_size, engine_backend = info.world_size, info.engine_backend
        for rank_file in info.rank_files():
            if not rank_file.is_file():
                self.add(file, "parameters[gpt_model_path]",
                         f"engine file {rank_file.name} is missing from '{engine_dir}' (world size {world_size})")
            elif self.deep and engine_backend == "pytorch":
                self.check_rank_file(rank_file, info)
        if self.deep:
            self.check_model_identity(core, info.pretrained)
        expected_backend = "tensorrtllm" if engine_backend == "tensorrtllm" else "python"
        if core.config.backend != expected_backend:
            self.add(file, "backend", f"is '{core.config.backend}' but the engine is a '{engine_backend}' engine "
                     f"(needs backend '{expected_backend}')")
        instances = sum(group.count or 1 for group in core.config.instance_group) or 1
        if instances != 1:
            self.add(file, "instance_group", f"{instances} instances; tensorrt_llm runs one instance (each would load "
                     f"the whole engine), more GPUs come from the engine's mapping / gpu_device_ids")
        if core.config.max_batch_size > info.max_batch_size:
            self.add(file, "max_batch_size", f"{core.config.max_batch_size} exceeds the engine's max_batch_size "
                     f"{info.max_batch_size}")
        beam = core.parameter("max_beam_width")
        if beam and beam.isdigit() and int(beam) > info.max_beam_width:
            self.add(file, "parameters[max_beam_width]", f"{beam} exceeds the engine's max_beam_width "
                     f"{info.max_beam_width}")
        if core.config.backend == "tensorrtllm":
            strategy = core.parameter("gpt_model_type")
            if strategy not in BATCHING_STRATEGIES:
                self.add(file, "parameters[gpt_model_type]", f"'{strategy}' is not one of {BATCHING_STRATEGIES}")
            self.check_kv_cache(core, info)
            devices = core.parameter("gpu_device_ids") or ""
            for instance, group in enumerate(devices.split(";") if devices else []):
                count = len([d for d in group.split(",") if d.strip()])
                if count != world_size:
                    self.add(file, "parameters[gpu_device_ids]", f"instance {instance} lists {count} GPUs "
                             f"('{group}') but the engine has world size {world_size}")

    def check_rank_file(self, rank_file: Path, info: EngineDir) -> None:
        """A pytorch engine rank file is whole (safetensors header and data) and its tensors fit the config."""
        try:
            header = read_safetensors_header(rank_file, exact=True)
        except GenRepoError as error:
            self.add(rank_file, "(file)", f"truncated or corrupt: {error}")
            return
        shapes = {name: list(entry["shape"]) for name, entry in header.items()}
        pretrained = info.pretrained
        tp, pp = info.mapping.tensor_parallel_size, info.mapping.pipeline_parallel_size
        vocab, hidden = pretrained.get("vocab_size"), pretrained.get("hidden_size")
        layers = {int(m.group(1)) for name in shapes for m in [re.match(r"transformer\.layers\.(\d+)\.", name)] if m}
        expected_layers = pretrained.get("num_hidden_layers")
        if pp == 1 and expected_layers is not None and layers and len(layers) != int(expected_layers):
            self.add(rank_file, "(tensors)", f"holds {len(layers)} layers but config.json says num_hidden_layers "
                     f"{expected_layers}: the rank file is of another model")
        embedding = shapes.get("transformer.vocab_embedding.weight")
        if embedding and len(embedding) == 2 and not pretrained.get("use_parallel_embedding"):
            if vocab is not None and embedding[0] != int(vocab):
                self.add(rank_file, "transformer.vocab_embedding.weight", f"has {embedding[0]} rows but config.json "
                         f"says vocab_size {vocab}")
            if hidden is not None and embedding[1] != int(hidden):
                self.add(rank_file, "transformer.vocab_embedding.weight", f"has {embedding[1]} columns but "
                         f"config.json says hidden_size {hidden}")
        head = shapes.get("lm_head.weight")
        if head and vocab is not None and not int(vocab) <= head[0] * tp < int(vocab) + tp:
            self.add(rank_file, "lm_head.weight", f"has {head[0]} rows (x tp {tp}) but config.json says vocab_size "
                     f"{vocab}")

    def check_model_identity(self, core: _Model, pretrained: dict[str, Any]) -> None:
        """The tokenizer (and the HF config next to it) belong to the engine's model."""
        preprocessing = self.model("preprocessing")
        tokenizer_dir = core.parameter("tokenizer_dir") or (preprocessing.parameter("tokenizer_dir")
                                                            if preprocessing is not None else None)
        if not tokenizer_dir or not Path(tokenizer_dir).is_dir():
            return
        directory = Path(tokenizer_dir)
        parsed: dict[str, Any] = {}
        for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
            path = directory / name
            if path.is_file():
                try:
                    parsed[name] = json.loads(path.read_text(encoding="utf-8"))
                except (json.JSONDecodeError, UnicodeDecodeError) as error:
                    self.add(path, "(json)", f"truncated or corrupt: {error}")
        vocab = pretrained.get("vocab_size")
        tokens = _tokenizer_size(parsed.get("tokenizer.json"))
        if tokens is not None and vocab is not None and tokens > int(vocab):
            self.add(directory / "tokenizer.json", "(vocab)", f"the tokenizer has {tokens} token ids but the engine's "
                     f"vocab_size is {vocab}: tokenizer and engine are of different models")
        hf = parsed.get("config.json")
        if isinstance(hf, dict):
            engine_family = _family(str(pretrained.get("architecture") or ""))
            hf_families = {_family(str(name)) for name in hf.get("architectures") or []}
            if engine_family and hf_families and engine_family not in hf_families:
                self.add(core.config_file, "parameters[gpt_model_path]", f"the engine is a "
                         f"{pretrained.get('architecture')} but the model's config.json in {tokenizer_dir} says "
                         f"{', '.join(map(str, hf.get('architectures') or []))}: the engine is of another model")
            for engine_key, hf_keys in _HF_KEYS.items():
                hf_value = next((hf[key] for key in hf_keys if isinstance(hf.get(key), int)), None)
                engine_value = pretrained.get(engine_key)
                if hf_value is not None and engine_value is not None and int(engine_value) != hf_value:
                    self.add(core.config_file, "parameters[gpt_model_path]", f"the engine's {engine_key} is "
                             f"{engine_value} but the model's config.json in {tokenizer_dir} says {hf_value}: "
                             "the engine is of another model")

    def check_kv_cache(self, core: _Model, info: EngineDir) -> None:
        """KV-cache parameters of the C++ backend against the engine's build."""
        file = core.config_file
        max_tokens = core.parameter("max_tokens_in_paged_kv_cache")
        max_seq_len = info.max_seq_len
        if max_tokens:
            if not max_tokens.isdigit():
                self.add(file, "parameters[max_tokens_in_paged_kv_cache]", f"'{max_tokens}' is not a whole number")
            elif int(max_tokens) < int(max_seq_len):
                self.add(file, "parameters[max_tokens_in_paged_kv_cache]", f"{max_tokens} tokens cannot hold one "
                         f"sequence of the engine's max_seq_len {max_seq_len}")
        fraction = core.parameter("kv_cache_free_gpu_mem_fraction")
        if fraction:
            try:
                valid = 0.0 < float(fraction) <= 1.0
            except ValueError:
                valid = False
            if not valid:
                self.add(file, "parameters[kv_cache_free_gpu_mem_fraction]", f"'{fraction}' is not in (0, 1]")
        if (core.parameter("enable_kv_cache_reuse") or "").lower() in ("true", "1") and not info.paged_context_fmha:
            self.add(file, "parameters[enable_kv_cache_reuse]",
                     "needs an engine built with use_paged_context_fmha (trtllm-build --use_paged_context_fmha enable)")

    def check_limits(self) -> None:
        """Repository-level batch limits of the python models vs the generation model."""
        core = self.model("tensorrt_llm")
        bls = self.model("tensorrt_llm_bls")
        if core is not None and bls is not None and bls.config.max_batch_size > core.config.max_batch_size:
            self.add(bls.config_file, "max_batch_size", f"{bls.config.max_batch_size} exceeds tensorrt_llm's "
                     f"{core.config.max_batch_size}")

    def check_bls_models(self) -> None:
        """The models the BLS calls by name are the ones of its group."""
        bls = self.model("tensorrt_llm_bls")
        if bls is None:
            return
        for key, role in _BLS_MODEL_PARAMETERS.items():
            named = bls.parameter(key) or role  # the BLS falls back to the unprefixed name
            if named != self.names[role]:
                self.add(bls.config_file, f"parameters[{key}]", f"names '{named}' but the {role} model of this "
                         f"repository group is '{self.names[role]}'")


def _family(architecture: str) -> str:
    """'MPTForCausalLM' and 'MptForCausalLM' -> 'mpt', 'Qwen2ForCausalLM' -> 'qwen' (TensorRT-LLM and HF spell
    some names differently)."""
    return re.sub(r"[^a-z]", "", architecture.lower().removesuffix("forcausallm"))


def _tokenizer_size(tokenizer: Any) -> int | None:
    """Token ids a tokenizer.json can produce (the highest id + 1), None when it cannot tell."""
    if not isinstance(tokenizer, dict):
        return None
    vocab = (tokenizer.get("model") or {}).get("vocab")
    ids: list[int] = []
    if isinstance(vocab, dict):
        ids = [value for value in vocab.values() if isinstance(value, int)]
    elif isinstance(vocab, list):
        ids = [len(vocab) - 1] if vocab else []
    ids += [token["id"] for token in tokenizer.get("added_tokens") or [] if isinstance(token.get("id"), int)]
    return max(ids) + 1 if ids else None


def _dtype(value: int) -> str:
    from tritonclient.grpc import model_config_pb2

    return str(model_config_pb2.DataType.Name(value))


def _field_of_line(line: str, line_number: int) -> str:
    """The field a placeholder sits in: a parameters key when the line has one, else the line's first key."""
    key = re.search(r'key:\s*"([^"]+)"', line)
    if key:
        return f"parameters[{key.group(1)}]"
    name = re.search(r'name:\s*"([^"]+)"', line)
    if name:
        return f"tensor[{name.group(1)}]"
    first = re.match(r"\s*([A-Za-z_]+)", line)
    return first.group(1) if first else f"line {line_number}"


def validate_repository(path: str | Path, streaming: bool = True, deep: bool = False) -> list[Problem]:
    """All problems found in the repository at `path` (empty when it is fine).

    `streaming`: the generation models must be decoupled (the default; render passes its `decoupled` setting).
    `deep`: also read the files the models load: every pytorch engine rank file is whole and fits config.json,
    tokenizer.json / tokenizer_config.json parse, and the tokenizer and the HF config.json next to it are of the
    engine's model (`gen-repo validate` does this; render, which may run before the weights exist, does not).
    """
    root = Path(path).resolve()
    if not root.is_dir():
        return [Problem(str(path), "(dir)", "repository directory does not exist")]
    checker = _Checker(root, streaming, deep)
    checker.load_models()
    if not checker.models and not checker.problems:
        return [Problem(str(path), "(dir)", "no */config.pbtxt found: not a Triton model repository")]
    checker.check_each_model()
    checker.check_strays()
    for names in checker.groups():
        checker.names = names
        checker.check_present()
        checker.check_streaming()
        checker.check_contract()
        checker.check_ensemble()
        checker.check_tokenizers()
        checker.check_engine()
        checker.check_limits()
        checker.check_bls_models()
    return list(dict.fromkeys(checker.problems))  # a shared model's problems are found once per group
