"""Look inside a TensorRT-LLM checkpoint, and merge a sharded one back into a single rank.

`describe_checkpoint` reads only config.json and the safetensors headers. `unshard_checkpoint` undoes every
split `generator.convert.job` makes (vocab padding, repeated KV heads, the per-rank [Q; K; V] order, expert and
MoE-TP splits, pipeline-stage layer renumbering) with the same shard rules, one tensor at a time, so the result
equals a TP1/PP1 conversion of the same model bit for bit.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from generator.convert.models import spec_class_for_checkpoint
from generator.convert.models.base import ShardLayout, merge_shards
from generator.errors import ConfigError, GenRepoError
from generator.formats.mapping import Mapping
from generator.formats.safetensors import (
    SafetensorsWriter,
    header_budget,
    read_safetensors_header,
    tensor_bytes,
)
from generator.formats.staging import check_output_dir, new_staging_dir, replace_dir
from generator.formats.trtllm_checkpoint import rank_file_name, read_checkpoint_config, read_mapping

_LAYER = re.compile(r"^transformer\.layers\.(\d+)\.")


def describe_checkpoint(checkpoint_dir: Path | str) -> dict[str, Any]:
    """Architecture, mapping and, per rank, its layers and every tensor's name, shape, dtype and bytes."""
    checkpoint_dir = Path(checkpoint_dir)
    config = read_checkpoint_config(checkpoint_dir)
    mapping = read_mapping(config)
    ranks = []
    for rank in range(mapping.world_size):
        rank_mapping = mapping.with_rank(rank)
        path = checkpoint_dir / rank_file_name(rank)
        if not path.is_file():
            raise GenRepoError(f"{path} is missing: the mapping declares {mapping.world_size} ranks")
        tensors = []
        for name, entry in read_safetensors_header(path).items():
            tensors.append({"name": name, "shape": entry["shape"], "dtype": entry["dtype"],
                            "bytes": tensor_bytes(entry)})
        ranks.append({"rank": rank, "tp_rank": rank_mapping.tp_rank, "pp_rank": rank_mapping.pp_rank,
                      "layers": rank_mapping.pp_layers(int(config["num_hidden_layers"])),
                      "file": path.name, "bytes": sum(t["bytes"] for t in tensors), "tensors": tensors})
    return {"directory": str(checkpoint_dir), "architecture": config.get("architecture"),
            "dtype": config.get("dtype"), "quantization": config.get("quantization"),
            "mapping": mapping.to_json(), "ranks": ranks}


def format_description(description: dict[str, Any]) -> str:
    """A human-readable rendering of `describe_checkpoint`'s result."""
    mapping = description["mapping"]
    lines = [f"{description['directory']}: {description['architecture']}, dtype {description['dtype']}, "
             f"quantization {description['quantization']}",
             "mapping: " + ", ".join(f"{key}={value}" for key, value in mapping.items())]
    for rank in description["ranks"]:
        layers = rank["layers"]
        lines.append(f"rank {rank['rank']} (tp {rank['tp_rank']}, pp {rank['pp_rank']}, layers "
                     f"{layers[0]}-{layers[-1]}): {rank['file']}, {len(rank['tensors'])} tensors, "
                     f"{rank['bytes'] / 2**20:.1f} MiB")
        for tensor in rank["tensors"]:
            lines.append(f"  {tensor['name']:<60} {tensor['dtype']:<5} {str(tensor['shape']):<22} {tensor['bytes']}")
    return "\n".join(lines)


def unshard_checkpoint(checkpoint_dir: Path | str, output_dir: Path | str) -> Path:
    """Merge any layout of a float (or float weight-only) checkpoint back into one TP1/PP1 checkpoint."""
    from safetensors import safe_open

    checkpoint_dir, output_dir = Path(checkpoint_dir), Path(output_dir)
    config = read_checkpoint_config(checkpoint_dir)
    if (config.get("quantization") or {}).get("quant_algo"):
        # weight-only checkpoints hold float weights (quantized at build); the older layout held int8 ones,
        # whose scales are computed per rank after the split: merged, they would not equal a TP1 conversion
        for path in sorted(checkpoint_dir.glob("rank*.safetensors")):
            if any(entry.get("dtype") == "I8" for entry in read_safetensors_header(path).values()):
                raise ConfigError(f"unshard cannot merge pre-quantized int8 weights ({path.name}); convert the "
                                  "model again (weight-only checkpoints now hold float weights)")
    spec_class = spec_class_for_checkpoint(config)
    layout = ShardLayout.from_trtllm_config(config)
    mapping = read_mapping(config)
    tp, num_layers = mapping.tensor_parallel_size, int(config["num_hidden_layers"])
    check_output_dir(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = new_staging_dir(output_dir)
    try:
        merged_config = dict(config, mapping=Mapping().to_json())
        (staging / "config.json").write_text(json.dumps(merged_config, indent=2) + "\n")
        first_ranks = [checkpoint_dir / rank_file_name(p * tp) for p in range(mapping.pipeline_parallel_size)]
        budget = header_budget([name for path in first_ranks for name in read_safetensors_header(path)])
        with SafetensorsWriter(staging / rank_file_name(0), budget) as writer:
            for pp_rank in range(mapping.pipeline_parallel_size):
                stage = [mapping.with_rank(pp_rank * tp + tp_rank) for tp_rank in range(tp)]
                first_layer = stage[0].pp_layers(num_layers)[0]
                paths = [checkpoint_dir / rank_file_name(m.rank) for m in stage]
                names = [list(read_safetensors_header(path)) for path in paths]
                if any(set(other) != set(names[0]) for other in names[1:]):
                    raise GenRepoError(f"the ranks of pipeline stage {pp_rank} hold different tensor names")
                for name in names[0]:
                    shards = []
                    for path in paths:
                        with safe_open(str(path), framework="pt") as handle:
                            shards.append(handle.get_tensor(name))
                    global_name = _global_name(name, first_layer)
                    writer.add(global_name, merge_shards(shards, spec_class.shard_rule(name), layout, stage[0]))
        replace_dir(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir


def _global_name(name: str, first_layer: int) -> str:
    """A stage-local tensor name with its layer index made global."""
    return _LAYER.sub(lambda match: f"transformer.layers.{int(match.group(1)) + first_layer}.", name)
