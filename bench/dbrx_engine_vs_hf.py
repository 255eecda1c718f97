"""DBRX at full width with few layers: the pytorch engine alone against transformers' `generate`, same weights.

Writes a random DBRX checkpoint in Hugging Face layout (d 6144, 48 heads, 8 KV heads, 16 experts top-4, ffn
10752, vocab 100352; `--layers` deep), generated on the GPU; converts and builds it (`gen-repo convert` + `build`), runs the
engine at the given batch sizes (128 input / 128 output tokens), and prints one JSON line per batch size. Run the
transformers side with `bench/hf_generate.py --hf WORK/hf` (an interpreter whose numpy transformers imports with).

    python3 bench/dbrx_engine_vs_hf.py --work /tmp/dbrx --layers 4 --batch-sizes 1,16
    /opt/torch/.venv/bin/python3 bench/hf_generate.py --hf /tmp/dbrx/hf --batch-sizes 1,16
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from generator.bench.engine import run_batch  # noqa: E402
from generator.build import BuildSettings, build_engine  # noqa: E402
from generator.convert.job import ConvertSettings, convert_checkpoint  # noqa: E402
from generator.engine import Executor  # noqa: E402
from generator.tiny import EOS_TOKEN, PAD_TOKEN, train_tokenizer  # noqa: E402


def write_random_dbrx(out: Path, args: argparse.Namespace) -> None:
    """One safetensors file per layer; std 1/sqrt(fan_in), norms near 1."""
    if (out / "model.safetensors.index.json").is_file():
        return
    out.mkdir(parents=True, exist_ok=True)
    d, heads, kv, experts, ffn, vocab = args.hidden, args.heads, args.kv_heads, args.experts, args.ffn, args.vocab
    hd = d // heads
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape: int, std: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device=device) * std).to(torch.bfloat16).cpu()

    weight_map: dict[str, str] = {}
    files = [("model-embed.safetensors", {"transformer.wte.weight": rand(vocab, d, std=1.0),
                                          "transformer.norm_f.weight": torch.ones(d, dtype=torch.bfloat16),
                                          "lm_head.weight": rand(vocab, d, std=d ** -0.5)})]
    for i in range(args.layers):
        p = f"transformer.blocks.{i}"
        files.append((f"model-layer{i:03d}.safetensors", {
            f"{p}.norm_attn_norm.norm_1.weight": torch.ones(d, dtype=torch.bfloat16),
            f"{p}.norm_attn_norm.norm_2.weight": torch.ones(d, dtype=torch.bfloat16),
            f"{p}.norm_attn_norm.attn.Wqkv.weight": rand(d + 2 * kv * hd, d, std=d ** -0.5),
            f"{p}.norm_attn_norm.attn.out_proj.weight": rand(d, d, std=d ** -0.5),
            f"{p}.ffn.router.layer.weight": rand(experts, d, std=d ** -0.5),
            f"{p}.ffn.experts.mlp.w1": rand(experts * ffn, d, std=d ** -0.5),
            f"{p}.ffn.experts.mlp.v1": rand(experts * ffn, d, std=d ** -0.5),
            f"{p}.ffn.experts.mlp.w2": rand(experts * ffn, d, std=ffn ** -0.5)}))
    for name, tensors in files:
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in tensors})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {
        "architectures": ["DbrxForCausalLM"], "model_type": "dbrx", "d_model": d, "n_heads": heads,
        "n_layers": args.layers, "max_seq_len": 4096, "vocab_size": vocab, "tie_word_embeddings": False,
        "attn_config": {"kv_n_heads": kv, "clip_qkv": 8.0, "rope_theta": 500000.0},
        "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"},
        "ffn_config": {"ffn_hidden_size": ffn, "moe_num_experts": experts, "moe_top_k": args.top_k,
                       "ffn_act_fn": {"name": "silu"}, "moe_normalize_expert_weights": 1.0},
        "torch_dtype": "bfloat16"}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    train_tokenizer(1024).save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=6144)
    parser.add_argument("--heads", type=int, default=48)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=10752)
    parser.add_argument("--vocab", type=int, default=100352)
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    args = parser.parse_args()
    started = time.perf_counter()
    write_random_dbrx(args.work / "hf", args)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    # convert and build only: the engine alone needs no Triton repository (nor tritonclient, which render reads
    # configs with); the engine's rank files are hard links to the checkpoint's, so the disk holds them once
    checkpoint = convert_checkpoint(ConvertSettings(args.work / "hf", args.work / "checkpoint", dtype="bfloat16",
                                                    progress=False))
    engine_dir = build_engine(BuildSettings(checkpoint, args.work / "engine", max_batch_size=max(batches),
                                            max_input_len=args.input_len,
                                            max_seq_len=args.input_len + args.output_len))
    print(f"checkpoint, convert and build: {time.perf_counter() - started:.1f} s", flush=True)
    run_args = argparse.Namespace(vocab=args.vocab, input_len=args.input_len, output_len=args.output_len,
                                  arrival_ms=0.0, end_id=None, min_tokens=0)  # no end id: every request runs full
    with Executor(engine_dir) as executor:
        run_batch(executor, 1, argparse.Namespace(**{**vars(run_args), "output_len": 4}))  # warm-up
        for batch in batches:
            row = run_batch(executor, batch, run_args)
            print(json.dumps({"engine_batch": batch, "tokens_per_s": round(row["tokens_per_s"], 1),
                              "decode_step_ms": round(row["decode_step_ms"], 2)}), flush=True)


if __name__ == "__main__":
    main()
