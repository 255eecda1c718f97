"""Serve the same random MPT-shaped model at several tensor-parallel sizes and compare greedy tokens and speed.

For each TP size: the whole job (`convert --tp-size T` -> `build --engine pytorch` -> `render`), then a real
tritonserver (`mpirun` leader mode when T > 1), then greedy requests of token ids straight to the
`tensorrt_llm` model over gRPC streaming: one at a time (latency) and `--concurrency` at once (throughput).
The generated ids of every TP size must equal those of the first.

    python bench/serve_tp_parity.py --work /tmp/tp --tp 1 2                                    # tiny, CPU (gloo)
    python bench/serve_tp_parity.py --work /tmp/tp --tp 1 2 --hidden 4096 --layers 32 \
        --heads 32 --vocab 50432 --dtype bfloat16 --input-len 128 --output-len 128              # MPT-7B shapes, GPUs

Random weights: every matrix, the tied embedding too, is drawn with std 1/sqrt(fan_in). A larger embedding
makes the tied head repeat the last token forever (its own logit grows with d). Logits then have unit spread:
float32 rounding never flips a greedy token between TP sizes, bfloat16 rounding can (compare in float32).
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from generator.pipeline import PipelineSettings, run_pipeline  # noqa: E402
from generator.serving.serve import ServeSettings, free_port, start_server, stop_server, wait_until_ready  # noqa: E402
from generator.tiny import EOS_TOKEN, PAD_TOKEN, train_tokenizer  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--prompts", type=int, default=4, help="distinct prompts checked for parity")
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8])
    parser.add_argument("--backend-directory", default=None, help="passed to tritonserver (device recipe)")
    parser.add_argument("--launcher", default="mpirun", choices=["mpirun", "local"])
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args()


def write_random_mpt(out_dir: Path, args: argparse.Namespace) -> None:
    """A random MPT checkpoint in Hugging Face layout (MPT-7B's config keys), one safetensors file per layer."""
    if (out_dir / "model.safetensors.index.json").is_file():
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    d, layers = args.hidden, args.layers
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    generator = torch.Generator(device=device).manual_seed(0)

    def rand(*shape: int, std: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator, device=device, dtype=torch.float32) * std).to(dtype).cpu()

    def ones_ish(n: int) -> torch.Tensor:
        return (1.0 + rand(n, std=0.05).float()).to(dtype)

    weight_map: dict[str, str] = {}
    files = [("model-embed.safetensors", {"transformer.wte.weight": rand(args.vocab, d, std=d ** -0.5),
                                          "transformer.norm_f.weight": ones_ish(d)})]
    for i in range(layers):
        prefix = f"transformer.blocks.{i}"
        files.append((f"model-layer{i:03d}.safetensors", {
            f"{prefix}.norm_1.weight": ones_ish(d), f"{prefix}.norm_2.weight": ones_ish(d),
            f"{prefix}.attn.Wqkv.weight": rand(3 * d, d, std=d ** -0.5),
            f"{prefix}.attn.out_proj.weight": rand(d, d, std=d ** -0.5),
            f"{prefix}.ffn.up_proj.weight": rand(4 * d, d, std=d ** -0.5),
            f"{prefix}.ffn.down_proj.weight": rand(d, 4 * d, std=(4 * d) ** -0.5)}))
    for name, tensors in files:
        save_file(tensors, str(out_dir / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in tensors})
    (out_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {"architectures": ["MPTForCausalLM"], "model_type": "mpt", "d_model": d, "n_heads": args.heads,
              "n_layers": layers, "expansion_ratio": 4, "max_seq_len": 2048, "vocab_size": args.vocab,
              "no_bias": True, "norm_type": "low_precision_layernorm", "layer_norm_epsilon": 1e-5,
              "learned_pos_emb": True, "logit_scale": None, "embedding_fraction": 1.0,
              "attn_config": {"attn_type": "multihead_attention", "alibi": True, "alibi_bias_max": 8,
                              "clip_qkv": None, "qk_ln": False, "softmax_scale": None, "prefix_lm": False,
                              "attn_uses_sequence_id": False, "attn_impl": "torch"},
              "torch_dtype": args.dtype, "tie_word_embeddings": True}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    # Any tokenizer will do: requests below send token ids straight to the tensorrt_llm model. Saved without
    # transformers' model classes, which do not import on the GPU image once numpy<2 is first on the path.
    train_tokenizer(1024).save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}))


def stream_requests(url: str, prompts: list[list[int]], output_len: int) -> tuple[list[list[int]], float]:
    """Send all prompts at once on one gRPC stream to `tensorrt_llm`; returns the generated ids and seconds."""
    import tritonclient.grpc as grpcclient

    results: queue.Queue[Any] = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    start = time.perf_counter()
    for index, ids in enumerate(prompts):
        tensors = []
        for name, value in (("input_ids", np.array([ids], dtype=np.int32)),
                            ("input_lengths", np.array([[len(ids)]], dtype=np.int32)),
                            ("request_output_len", np.array([[output_len]], dtype=np.int32)),
                            ("exclude_input_in_output", np.array([[True]], dtype=bool))):
            tensor = grpcclient.InferInput(name, list(value.shape), "BOOL" if value.dtype == bool else "INT32")
            tensor.set_data_from_numpy(value)
            tensors.append(tensor)
        client.async_stream_infer("tensorrt_llm", tensors, request_id=str(index))
    outputs: dict[int, list[int]] = {}
    while len(outputs) < len(prompts):
        result, error = results.get(timeout=600)
        if error is not None:
            raise RuntimeError(str(error))
        index = int(result.get_response().id)
        ids_out = result.as_numpy("output_ids")
        length = int(result.as_numpy("sequence_length").reshape(-1)[0])
        outputs[index] = ids_out.reshape(-1)[:length].tolist()
    seconds = time.perf_counter() - start
    client.stop_stream()
    client.close()
    return [outputs[i] for i in range(len(prompts))], seconds


def main() -> None:
    args = parse_args()
    hf_dir = args.work / "hf"
    started = time.perf_counter()
    write_random_mpt(hf_dir, args)
    print(f"random HF checkpoint: {time.perf_counter() - started:.1f} s", flush=True)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, args.vocab, args.input_len).tolist() for _ in range(args.prompts)]
    report: dict[str, Any] = {"shape": {k: getattr(args, k) for k in ("hidden", "layers", "heads", "vocab", "dtype",
                                                                      "input_len", "output_len")}, "runs": {}}
    reference: list[list[int]] | None = None
    for tp in args.tp:
        out = args.work / f"tp{tp}"
        t0 = time.perf_counter()
        result = run_pipeline(PipelineSettings(
            model=str(hf_dir), output_dir=out, dtype=args.dtype, tensor_parallel_size=tp, workers=tp,
            max_batch_size=max(args.concurrency + [args.prompts]),
            max_input_len=args.input_len, max_seq_len=args.input_len + args.output_len, progress=False))
        job_s = time.perf_counter() - t0
        ports = [free_port() for _ in range(3)]
        extra = (f"--backend-directory={args.backend_directory}",) if args.backend_directory else ()
        settings = ServeSettings(model_repository=result.triton_repo, http_port=ports[0], grpc_port=ports[1],
                                 metrics_port=ports[2], master_port=free_port(), extra_args=extra,
                                 launcher=args.launcher)
        t0 = time.perf_counter()
        process, log_file = start_server(settings)
        try:
            wait_until_ready(process, "127.0.0.1", ports[0], 900.0, log_file)
            ready_s = time.perf_counter() - t0
            url = f"127.0.0.1:{ports[1]}"
            stream_requests(url, prompts[:1], 4)  # warm-up
            single, latency = [], []
            for ids in prompts:
                generated, seconds = stream_requests(url, [ids], args.output_len)
                single += generated
                latency.append(seconds)
            run: dict[str, Any] = {"convert_build_render_s": round(job_s, 1), "server_ready_s": round(ready_s, 1),
                                   "batch1_request_s": [round(s, 3) for s in latency],
                                   "batch1_tokens_per_s": round(args.output_len / min(latency), 1)}
            for concurrency in args.concurrency:
                batch = [prompts[i % len(prompts)] for i in range(concurrency)]
                generated, seconds = stream_requests(url, batch, args.output_len)
                run[f"concurrency{concurrency}_s"] = round(seconds, 3)
                run[f"concurrency{concurrency}_tokens_per_s"] = round(concurrency * args.output_len / seconds, 1)
                run[f"concurrency{concurrency}_matches_single"] = all(
                    generated[i] == single[i % len(prompts)] for i in range(concurrency))
        finally:
            stop_server(process)
        if reference is None:
            reference = single
        run["tokens_equal_first_tp"] = single == reference
        run["first_tokens"] = single[0][:12]
        report["runs"][f"tp{tp}"] = run
        print(f"tp{tp}: {json.dumps(run)}", flush=True)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if not all(run["tokens_equal_first_tp"] for run in report["runs"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
