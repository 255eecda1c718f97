"""The `gen-repo` command line: parses flags, builds each step's settings and calls the step.

Each subcommand lives beside its step's settings; this module holds no logic of its own.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from generator.errors import GenRepoError


class _Group(click.Group):
    """Turns `GenRepoError` into a one-line message and exit code 2, without a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except GenRepoError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(2)


@click.group(cls=_Group, invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "model", metavar="PRESET|DIR", help="Run convert -> build -> render for a preset name "
              "(see `gen-repo models`) or a local Hugging Face checkpoint directory.")
@click.option("--output", "output", type=click.Path(), default="model_repo", show_default=True,
              help="Directory for the whole job's output (checkpoint/, engine/, tokenizer/, triton_repo/).")
@click.pass_context
def main(ctx: click.Context, model: str | None, output: str) -> None:
    """gen-repo: Hugging Face LLM checkpoint -> TensorRT-LLM checkpoint -> engine -> Triton repository."""
    if ctx.invoked_subcommand is not None:
        return
    if model is None:
        click.echo(ctx.get_help())
        return
    raise GenRepoError("the whole-job pipeline is not wired yet")


@main.command("convert")
@click.option("--model-dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Hugging Face checkpoint directory (config.json + *.safetensors or pytorch_model*.bin).")
@click.option("--output", "output_dir", required=True, type=click.Path(path_type=Path),
              help="TensorRT-LLM checkpoint directory to write (config.json + rank{r}.safetensors); replaced "
              "if it already holds a checkpoint.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto",
              show_default=True, help="Weight dtype of the checkpoint; auto keeps the HF checkpoint's dtype.")
@click.option("--tp-size", "tensor_parallel_size", type=int, default=1, show_default=True,
              help="Tensor-parallel size T: attention heads, MLP and lm_head are split over T ranks.")
@click.option("--pp-size", "pipeline_parallel_size", type=int, default=1, show_default=True,
              help="Pipeline-parallel size P: layers are split into P contiguous stages; T*P rank files.")
@click.option("--moe-tp-size", "moe_tensor_parallel_size", type=int, default=None,
              help="MoE (DBRX) only: split each expert's FFN over this many ranks. With --moe-ep-size the "
              "product must be T; default T (or T / --moe-ep-size).")
@click.option("--moe-ep-size", "moe_expert_parallel_size", type=int, default=None,
              help="MoE (DBRX) only: distribute the experts over this many ranks (expert parallelism); "
              "default 1 (or T / --moe-tp-size).")
@click.option("--workers", type=int, default=1, show_default=True,
              help="Ranks converted in parallel (threads); memory grows with about one tensor per worker.")
@click.option("--use-weight-only", is_flag=True,
              help="Weight-only quantization of the GEMM weights (qkv, dense, fc, proj); see "
              "--weight-only-precision.")
@click.option("--weight-only-precision", type=click.Choice(["int8", "int4"]), default="int8", show_default=True,
              help="Precision for --use-weight-only: int8 (W8A16) or int4 (W4A16).")
@click.option("--int8-kv-cache", is_flag=True,
              help="INT8 KV cache: calibrate per-layer scales by running the HF model (CPU, float32) on text.")
@click.option("--calib-text", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Text file for --int8-kv-cache calibration (default: the text shipped with gen-repo).")
@click.option("--trust-remote-code", is_flag=True,
              help="Allow the checkpoint's own modeling code (llm-foundry MPT) for --int8-kv-cache "
              "calibration; needed for GQA/MQA MPT such as Replit Code v1.5.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def convert_command(model_dir: Path, output_dir: Path, dtype: str, tensor_parallel_size: int,
                    pipeline_parallel_size: int, moe_tensor_parallel_size: int | None,
                    moe_expert_parallel_size: int | None, workers: int, use_weight_only: bool,
                    weight_only_precision: str, int8_kv_cache: bool, calib_text: Path | None,
                    trust_remote_code: bool, quiet: bool) -> None:
    """Convert a Hugging Face MPT / DBRX checkpoint into a TensorRT-LLM checkpoint."""
    from generator.convert import ConvertSettings, convert_checkpoint

    settings = ConvertSettings(
        model_dir=model_dir, output_dir=output_dir, dtype=dtype, tensor_parallel_size=tensor_parallel_size,
        pipeline_parallel_size=pipeline_parallel_size, moe_tensor_parallel_size=moe_tensor_parallel_size,
        moe_expert_parallel_size=moe_expert_parallel_size, workers=workers,
        weight_only_precision=weight_only_precision if use_weight_only else None, int8_kv_cache=int8_kv_cache,
        calib_text=calib_text, trust_remote_code=trust_remote_code, progress=not quiet)
    click.echo(str(convert_checkpoint(settings)))


@main.command("inspect")
@click.argument("checkpoint_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--unshard", "unshard_dir", type=click.Path(path_type=Path), default=None,
              help="Also merge the checkpoint back into a single-rank (TP1/PP1) checkpoint in this directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
def inspect_command(checkpoint_dir: Path, unshard_dir: Path | None, as_json: bool) -> None:
    """Describe a TensorRT-LLM checkpoint: mapping, ranks, and every tensor's shape, dtype and size."""
    from generator.inspect import describe_checkpoint, format_description, unshard_checkpoint

    description = describe_checkpoint(checkpoint_dir)
    click.echo(json.dumps(description, indent=2) if as_json else format_description(description))
    if unshard_dir is not None:
        click.echo(f"unsharded into {unshard_checkpoint(checkpoint_dir, unshard_dir)}")


@main.command("build")
@click.option("--checkpoint-dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="TensorRT-LLM checkpoint directory (config.json + rank{r}.safetensors), e.g. from `convert`.")
@click.option("--output", "output_dir", required=True, type=click.Path(path_type=Path),
              help="Engine directory to write.")
@click.option("--engine", "engine_backend", type=click.Choice(["pytorch", "tensorrtllm"]), default="pytorch",
              show_default=True, help="pytorch: gen-repo's PyTorch engine (links the weights); tensorrtllm: the "
              "real trtllm-build (needs TensorRT-LLM, i.e. NVIDIA's container).")
@click.option("--max-batch-size", type=int, default=8, show_default=True, help="Requests running at once.")
@click.option("--max-input-len", type=int, default=1024, show_default=True, help="Longest prompt, in tokens.")
@click.option("--max-seq-len", type=int, default=None,
              help="Longest prompt + output; default the checkpoint's max_position_embeddings (else 2048).")
@click.option("--max-num-tokens", type=int, default=None,
              help="Most tokens in one forward (context phase); default min(8192, batch x input len).")
@click.option("--workers", type=int, default=1, show_default=True, help="Ranks built in parallel (tensorrtllm).")
@click.option("--dry-run", is_flag=True, help="Print what would be built (the trtllm-build commands) and stop.")
def build_command(checkpoint_dir: Path, output_dir: Path, engine_backend: str, max_batch_size: int,
                  max_input_len: int, max_seq_len: int | None, max_num_tokens: int | None, workers: int,
                  dry_run: bool) -> None:
    """Build an engine dir from a TensorRT-LLM checkpoint."""
    from generator.build import BuildSettings, build_engine

    settings = BuildSettings(checkpoint_dir=checkpoint_dir, output_dir=output_dir, engine_backend=engine_backend,
                             max_batch_size=max_batch_size, max_input_len=max_input_len, max_seq_len=max_seq_len,
                             max_num_tokens=max_num_tokens, workers=workers, dry_run=dry_run)
    click.echo(str(build_engine(settings)))


@main.command("run")
@click.argument("prompts", nargs=-1)
@click.option("--engine-dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Engine dir written by `gen-repo build --engine pytorch`.")
@click.option("--tokenizer-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Tokenizer for text prompts and decoding the output (default: none, ids only).")
@click.option("--input-ids", "input_ids", multiple=True,
              help="A prompt as token ids, comma or space separated; repeat for several prompts.")
@click.option("--max-tokens", "max_new_tokens", type=int, default=32, show_default=True,
              help="New tokens per prompt.")
@click.option("--end-id", type=int, default=None, help="Stop token (default: the tokenizer's eos).")
@click.option("--temperature", type=float, default=1.0, show_default=True)
@click.option("--top-k", type=int, default=0, show_default=True, help="0 with --top-p 0: greedy.")
@click.option("--top-p", type=float, default=0.0, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--device", default=None, help="torch device (default cuda:<local rank> if available, else cpu).")
@click.option("--json", "as_json", is_flag=True, help="One JSON line per prompt (ids, text, finish reason).")
def run_command(prompts: tuple[str, ...], engine_dir: Path, tokenizer_dir: Path | None, input_ids: tuple[str, ...],
                max_new_tokens: int, end_id: int | None, temperature: float, top_k: int, top_p: float,
                seed: int | None, device: str | None, as_json: bool) -> None:
    """Generate with the pytorch engine (no Triton). Several ranks: `mpirun -n N gen-repo run ...`."""
    from generator.run import RunSettings, print_outputs, run

    try:
        ids = [[int(t) for t in text.replace(",", " ").split()] for text in input_ids]
    except ValueError as error:
        raise GenRepoError(f"--input-ids takes integers: {error}") from error
    settings = RunSettings(engine_dir=engine_dir, prompts=list(prompts), input_ids=ids,
                           tokenizer_dir=tokenizer_dir, max_new_tokens=max_new_tokens, end_id=end_id,
                           temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, as_json=as_json,
                           device=device)
    outputs = run(settings)
    if outputs is not None:
        print_outputs(outputs, as_json)


if __name__ == "__main__":
    main()
