"""The `gen-repo` command line: parses flags, builds each step's settings and calls the step.

Each subcommand lives beside its step's settings; this module holds no logic of its own.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from generator.bench.eval import DEFAULT_MAX_INPUT_LEN as EVAL_MAX_INPUT_LEN
from generator.bench.eval import EvalSettings
from generator.build import DEFAULT_MAX_INPUT_LEN, DEFAULT_MAX_NUM_TOKENS, DEFAULT_MAX_SEQ_LEN, BuildSettings
from generator.convert import ConvertSettings
from generator.errors import GenRepoError
from generator.formats.dtypes import DTYPE_CHOICES
from generator.formats.engine_dir import ENGINE_BACKENDS
from generator.pipeline import PipelineSettings
from generator.presets import DEFAULT_GPU_MEMORY_GIB
from generator.run import RunSettings
from generator.serving.render import (
    BATCH_SCHEDULER_POLICIES,
    BATCHING_STRATEGIES,
    LONG_INPUT_LEN,
    Batching,
    EngineOverrides,
    RenderSettings,
    RepositoryLayout,
    TensorrtllmOptions,
    TextOptions,
)
from generator.serving.serve import LAUNCHERS, ServeSettings


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
@click.option("--output", "output", type=click.Path(), default=str(PipelineSettings.output_dir), show_default=True,
              help="Directory for the whole job's output (checkpoint/, engine/, tokenizer/, triton_repo/).")
@click.option("--model-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Local Hugging Face checkpoint for a real preset (e.g. --model mpt-7b --model-dir ./mpt-7b).")
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default=None,
              help="Checkpoint dtype (default: the preset's; auto = the HF checkpoint's).")
@click.option("--tp-size", "tensor_parallel_size", type=int, default=None,
              help=f"Tensor-parallel size (default: the preset's, else {ConvertSettings.tensor_parallel_size}).")
@click.option("--pp-size", "pipeline_parallel_size", type=int, default=None,
              help=f"Pipeline-parallel size (default: the preset's, else {ConvertSettings.pipeline_parallel_size}).")
@click.option("--moe-tp-size", "moe_tensor_parallel_size", type=int, default=None,
              help="MoE only: tensor-parallel size inside each expert.")
@click.option("--moe-ep-size", "moe_expert_parallel_size", type=int, default=None,
              help="MoE only: expert-parallel size.")
@click.option("--engine", "engine_backend", type=click.Choice(ENGINE_BACKENDS),
              default=PipelineSettings.engine_backend, show_default=True,
              help="Engine backend: our PyTorch engine, or real trtllm-build (NVIDIA container).")
@click.option("--max-batch-size", type=int, default=None, help="Engine limit (default: the preset's).")
@click.option("--max-input-len", type=int, default=None, help="Engine limit (default: the preset's).")
@click.option("--max-seq-len", type=int, default=None, help="Engine limit: prompt + new tokens (default: the preset's).")
@click.option("--max-num-tokens", type=int, default=None, help="Engine limit: tokens per step (default: build's).")
@click.option("--workers", type=int, default=PipelineSettings.workers, show_default=True,
              help="Ranks converted / built in parallel.")
@click.option("--weight-only-precision", type=click.Choice(["int8", "int4"]), default=None,
              help="Weight-only quantization of the GEMM weights (default: none).")
@click.option("--int8-kv-cache", is_flag=True, help="Calibrate and use an INT8 KV cache.")
@click.option("--trust-remote-code", is_flag=True, help="Allow the checkpoint's own Python code (never by default).")
@click.pass_context
def main(ctx: click.Context, model: str | None, output: str, model_dir: Path | None, dtype: str | None,
         tensor_parallel_size: int | None, pipeline_parallel_size: int | None,
         moe_tensor_parallel_size: int | None, moe_expert_parallel_size: int | None, engine_backend: str,
         max_batch_size: int | None, max_input_len: int | None, max_seq_len: int | None,
         max_num_tokens: int | None, workers: int, weight_only_precision: str | None, int8_kv_cache: bool,
         trust_remote_code: bool) -> None:
    """gen-repo: Hugging Face LLM checkpoint -> TensorRT-LLM checkpoint -> engine -> Triton repository.

    With --model (and no subcommand) it runs the whole job into --output; see the subcommands for each step.
    """
    if ctx.invoked_subcommand is not None:
        return
    if model is None:
        click.echo(ctx.get_help())
        return
    from generator.pipeline import run_pipeline

    run_pipeline(PipelineSettings(
        model=model, output_dir=Path(output), model_dir=model_dir, dtype=dtype,
        tensor_parallel_size=tensor_parallel_size, pipeline_parallel_size=pipeline_parallel_size,
        moe_tensor_parallel_size=moe_tensor_parallel_size, moe_expert_parallel_size=moe_expert_parallel_size,
        engine_backend=engine_backend, max_batch_size=max_batch_size, max_input_len=max_input_len,
        max_seq_len=max_seq_len, max_num_tokens=max_num_tokens, workers=workers,
        weight_only_precision=weight_only_precision, int8_kv_cache=int8_kv_cache,
        trust_remote_code=trust_remote_code))


@main.command("convert")
@click.option("--model-dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Hugging Face checkpoint directory (config.json + *.safetensors or pytorch_model*.bin).")
@click.option("--output", "output_dir", required=True, type=click.Path(path_type=Path),
              help="TensorRT-LLM checkpoint directory to write (config.json + rank{r}.safetensors); replaced "
              "if it already holds a checkpoint.")
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default=ConvertSettings.dtype,
              show_default=True, help="Weight dtype of the checkpoint; auto keeps the HF checkpoint's dtype.")
@click.option("--tp-size", "tensor_parallel_size", type=int, default=ConvertSettings.tensor_parallel_size,
              show_default=True,
              help="Tensor-parallel size T: attention heads, MLP and lm_head are split over T ranks.")
@click.option("--pp-size", "pipeline_parallel_size", type=int, default=ConvertSettings.pipeline_parallel_size,
              show_default=True,
              help="Pipeline-parallel size P: layers are split into P contiguous stages; T*P rank files.")
@click.option("--moe-tp-size", "moe_tensor_parallel_size", type=int, default=None,
              help="MoE (DBRX) only: split each expert's FFN over this many ranks. With --moe-ep-size the "
              "product must be T; default T (or T / --moe-ep-size).")
@click.option("--moe-ep-size", "moe_expert_parallel_size", type=int, default=None,
              help="MoE (DBRX) only: distribute the experts over this many ranks (expert parallelism); "
              "default 1 (or T / --moe-tp-size).")
@click.option("--workers", type=int, default=ConvertSettings.workers, show_default=True,
              help="Ranks converted in parallel (threads); memory grows with about one tensor per worker.")
@click.option("--use-weight-only", is_flag=True,
              help="Weight-only quantization of the GEMM weights (qkv, dense, fc, proj): records quant_algo and "
              "keeps float weights, as TensorRT-LLM's loader expects; the build step quantizes them (see "
              "--weight-only-precision).")
@click.option("--weight-only-precision", type=click.Choice(["int8", "int4"]), default="int8", show_default=True,
              help="Precision for --use-weight-only: int8 (W8A16) or int4 (W4A16).")
@click.option("--weight-only-at-build", is_flag=True, hidden=True,
              help="Accepted for compatibility; no effect (weight-only checkpoints always hold float weights + "
              "quant_algo, which trtllm-build and `gen-repo build` quantize).")
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
                    weight_only_precision: str, weight_only_at_build: bool, int8_kv_cache: bool,
                    calib_text: Path | None,
                    trust_remote_code: bool, quiet: bool) -> None:
    """Convert a Hugging Face MPT / DBRX checkpoint into a TensorRT-LLM checkpoint."""
    from generator.convert.job import convert_checkpoint

    settings = ConvertSettings(
        model_dir=model_dir, output_dir=output_dir, dtype=dtype, tensor_parallel_size=tensor_parallel_size,
        pipeline_parallel_size=pipeline_parallel_size, moe_tensor_parallel_size=moe_tensor_parallel_size,
        moe_expert_parallel_size=moe_expert_parallel_size, workers=workers,
        weight_only_precision=weight_only_precision if use_weight_only else None,
        weight_only_at_build=weight_only_at_build, int8_kv_cache=int8_kv_cache, calib_text=calib_text, trust_remote_code=trust_remote_code, progress=not quiet)
    click.echo(str(convert_checkpoint(settings)))


@main.command("inspect")
@click.argument("checkpoint_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--unshard", "unshard_dir", type=click.Path(path_type=Path), default=None,
              help="Also merge the checkpoint back into a single-rank (TP1/PP1) checkpoint in this directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
def inspect_command(checkpoint_dir: Path, unshard_dir: Path | None, as_json: bool) -> None:
    """Describe a TensorRT-LLM checkpoint: mapping, ranks, and every tensor's shape, dtype and size."""
    from generator.convert.inspect import describe_checkpoint, format_description, unshard_checkpoint

    description = describe_checkpoint(checkpoint_dir)
    click.echo(json.dumps(description, indent=2) if as_json else format_description(description))
    if unshard_dir is not None:
        click.echo(f"unsharded into {unshard_checkpoint(checkpoint_dir, unshard_dir)}")


@main.command("build")
@click.option("--checkpoint-dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="TensorRT-LLM checkpoint directory (config.json + rank{r}.safetensors), e.g. from `convert`.")
@click.option("--output", "output_dir", required=True, type=click.Path(path_type=Path),
              help="Engine directory to write.")
@click.option("--engine", "engine_backend", type=click.Choice(ENGINE_BACKENDS), default=BuildSettings.engine_backend,
              show_default=True, help="pytorch: gen-repo's PyTorch engine (links the weights; quantizes "
              "weight-only ones); tensorrtllm: the real trtllm-build (needs TensorRT-LLM, i.e. NVIDIA's container).")
@click.option("--max-batch-size", type=int, default=BuildSettings.max_batch_size, show_default=True,
              help="Requests running at once.")
@click.option("--max-input-len", type=int, default=BuildSettings.max_input_len,
              help=f"Longest prompt, in tokens; default min({DEFAULT_MAX_INPUT_LEN}, max-seq-len / 2).")
@click.option("--max-seq-len", type=int, default=BuildSettings.max_seq_len,
              help=f"Longest prompt + output; default the checkpoint's max_position_embeddings (else "
              f"{DEFAULT_MAX_SEQ_LEN}).")
@click.option("--max-num-tokens", type=int, default=BuildSettings.max_num_tokens,
              help=f"Most tokens in one forward (context phase); default min({DEFAULT_MAX_NUM_TOKENS}, batch x input "
              "len).")
@click.option("--workers", type=int, default=BuildSettings.workers, show_default=True,
              help="Ranks built in parallel (tensorrtllm).")
@click.option("--dry-run", is_flag=True, help="Print what would be built (the trtllm-build commands) and stop.")
def build_command(checkpoint_dir: Path, output_dir: Path, engine_backend: str, max_batch_size: int,
                  max_input_len: int | None, max_seq_len: int | None, max_num_tokens: int | None, workers: int,
                  dry_run: bool) -> None:
    """Build an engine dir from a TensorRT-LLM checkpoint."""
    from generator.build import build_engine

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
@click.option("--max-tokens", "max_new_tokens", type=int, default=RunSettings.max_new_tokens, show_default=True,
              help="New tokens per prompt.")
@click.option("--end-id", type=int, default=None, help="Stop token (default: the tokenizer's eos).")
@click.option("--temperature", type=float, default=RunSettings.temperature, show_default=True)
@click.option("--top-k", type=int, default=RunSettings.top_k, show_default=True, help="0 with --top-p 0: greedy.")
@click.option("--top-p", type=float, default=RunSettings.top_p, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--device", default=None, help="torch device (default cuda:<local rank> if available, else cpu).")
@click.option("--json", "as_json", is_flag=True, help="One JSON line per prompt (ids, text, finish reason).")
def run_command(prompts: tuple[str, ...], engine_dir: Path, tokenizer_dir: Path | None, input_ids: tuple[str, ...],
                max_new_tokens: int, end_id: int | None, temperature: float, top_k: int, top_p: float,
                seed: int | None, device: str | None, as_json: bool) -> None:
    """Generate with the pytorch engine (no Triton). Several ranks: `mpirun -n N gen-repo run ...`."""
    from generator.run import print_outputs, run

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


@main.command("bench", context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                         "help_option_names": []})
@click.argument("bench_args", nargs=-1, type=click.UNPROCESSED)
def bench_command(bench_args: tuple[str, ...]) -> None:
    """Tokens/s of the pytorch engine (default, or --direct), or of a served stack with --url (see --help)."""
    from generator.bench.engine import main as bench_main

    args = list(bench_args)
    if any(arg == "--url" or arg.startswith("--url=") for arg in args):
        from generator.bench.served import main as served_main

        code = served_main(args)
    else:
        code = bench_main([arg for arg in args if arg != "--direct"])
    if code:
        sys.exit(code)


@main.command("models")
@click.option("--gpu-memory", "gpu_memory_gib", type=float, default=DEFAULT_GPU_MEMORY_GIB, show_default=True,
              help="GPU memory in GiB for the 'which layouts fit' column.")
def models_command(gpu_memory_gib: float) -> None:
    """List the presets: parameters, weight bytes per dtype and the parallel layouts that fit."""
    from generator.presets import models_table

    click.echo(models_table(gpu_memory_gib))


@main.command("serve")
@click.option("--model-repository", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The Triton repository (`<output>/triton_repo` of the whole job).")
@click.option("--host", default=ServeSettings.host, show_default=True,
              help="Address all endpoints bind to (0.0.0.0 to accept remote clients).")
@click.option("--http-port", type=int, default=ServeSettings.http_port, show_default=True,
              help="HTTP/REST port (generate, health).")
@click.option("--grpc-port", type=int, default=ServeSettings.grpc_port, show_default=True,
              help="gRPC port (streaming).")
@click.option("--metrics-port", type=int, default=ServeSettings.metrics_port, show_default=True,
              help="Prometheus /metrics port.")
@click.option("--triton-bin", default=None, help="tritonserver binary (default: $TRITON_BIN, PATH, then the "
              "nvidia-pytriton wheel).")
@click.option("--world-size", type=int, default=None,
              help="Ranks (default: the engine's tp x pp); > 1 launches one tritonserver per rank under mpirun.")
@click.option("--launcher", type=click.Choice(LAUNCHERS), default=ServeSettings.launcher, show_default=True,
              help="How ranks start when the world size is > 1: mpirun (leader mode, as TensorRT-LLM's "
              "launch_triton_server.py), or local (one host without MPI: generator.serving.local_launch).")
@click.option("--multi-model", is_flag=True,
              help="TensorRT-LLM's orchestrator mode (tensorrtllm backend only): one tritonserver whose backend "
              "spawns each engine's ranks (TRTLLM_ORCHESTRATOR=1), so a repository can hold several engines.")
@click.option("--disable-spawn-processes", is_flag=True,
              help="With --multi-model: start the ranks with mpirun (TRTLLM_ORCHESTRATOR_SPAWN_PROCESSES=0) "
              "instead of letting the backend spawn them, as launch_triton_server.py's flag of that name.")
@click.option("--tensorrt-llm-model-name", default=ServeSettings.tensorrt_llm_model_name, show_default=True,
              help="The engine model(s), comma-separated: ranks > 0 load only these (leader mode).")
@click.option("--openai-port", type=int, default=None,
              help="Also serve the OpenAI-compatible API (/v1/completions, /v1/chat/completions) on this port.")
@click.option("--chat-template", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="With --openai-port: a Jinja chat template instead of the tokenizer's own.")
@click.option("--log-file", type=click.Path(path_type=Path), default=None,
              help="Server output (default: tritonserver.log next to the repository).")
@click.option("--log-verbose", type=int, default=ServeSettings.log_verbose, show_default=True,
              help="tritonserver --log-verbose level.")
@click.option("--ready-timeout", "ready_timeout_s", type=float, default=ServeSettings.ready_timeout_s,
              show_default=True,
              help="Seconds to wait for /v2/health/ready.")
@click.option("--exit-timeout", "exit_timeout_s", type=click.IntRange(min=0), default=ServeSettings.exit_timeout_s,
              show_default=True,
              help="Seconds a stop (Ctrl-C, SIGTERM) waits for requests in flight before tritonserver exits "
              "(its --exit-timeout-secs); a second Ctrl-C kills it at once.")
@click.option("--dry-run", is_flag=True, help="Print the exact command (and PATH/LD_LIBRARY_PATH) and exit.")
@click.argument("extra_args", nargs=-1, type=click.UNPROCESSED)
def serve_command(model_repository: Path, host: str, http_port: int, grpc_port: int, metrics_port: int,
                  triton_bin: str | None, world_size: int | None, launcher: str, multi_model: bool,
                  disable_spawn_processes: bool, tensorrt_llm_model_name: str, openai_port: int | None,
                  chat_template: Path | None, log_file: Path | None,
                  log_verbose: int, ready_timeout_s: float, exit_timeout_s: int, dry_run: bool,
                  extra_args: tuple[str, ...]) -> None:
    """Run tritonserver on a repository until Ctrl-C; extra args after `--` go to tritonserver."""
    from generator.serving.serve import serve

    sys.exit(serve(ServeSettings(
        model_repository=model_repository, host=host, http_port=http_port, grpc_port=grpc_port,
        metrics_port=metrics_port, triton_bin=triton_bin, world_size=world_size, launcher=launcher,
        multi_model=multi_model, tensorrt_llm_model_name=tensorrt_llm_model_name, openai_port=openai_port,
        chat_template=chat_template, log_file=log_file,
        log_verbose=log_verbose, ready_timeout_s=ready_timeout_s, dry_run=dry_run, extra_args=extra_args,
        spawn_processes=not disable_spawn_processes, exit_timeout_s=exit_timeout_s)))


@main.command("infer")
@click.argument("prompt")
@click.option("--url", default=None, help="host:port (default localhost:8001 for grpc, localhost:8000 for http).")
@click.option("--protocol", type=click.Choice(["grpc", "http"]), default="grpc", show_default=True)
@click.option("--model", type=click.Choice(["ensemble", "tensorrt_llm_bls"]), default="ensemble", show_default=True)
@click.option("--stream", is_flag=True, help="Print tokens as they are generated.")
@click.option("--max-tokens", type=int, default=32, show_default=True, help="Most new tokens.")
@click.option("--temperature", type=float, default=None)
@click.option("--top-k", type=int, default=None)
@click.option("--top-p", type=float, default=None)
@click.option("--seed", type=int, default=None, help="Sampling seed (random_seed).")
@click.option("--stop-word", "stop_words", multiple=True, help="Stop when this text is generated (repeatable).")
@click.option("--bad-word", "bad_words", multiple=True, help="Never generate this text (repeatable).")
@click.option("--end-id", type=int, default=None, help="Token id that ends generation.")
@click.option("--pad-id", type=int, default=None)
@click.option("--repetition-penalty", type=float, default=None)
@click.option("--presence-penalty", type=float, default=None)
@click.option("--frequency-penalty", type=float, default=None)
@click.option("--exclude-input-in-output/--include-input-in-output", default=None,
              help="Whether the answer repeats the prompt (default: the model's setting; a streamed answer "
                   "only with --include-input-in-output, which prints the prompt first).")
@click.option("--wait", "wait_s", type=float, default=0.0, show_default=True,
              help="Wait up to this many seconds for the server and model to be ready.")
@click.option("--timeout", "timeout_s", type=float, default=300.0, show_default=True)
def infer_command(prompt: str, url: str | None, protocol: str, model: str, stream: bool, max_tokens: int,
                  temperature: float | None, top_k: int | None, top_p: float | None, seed: int | None,
                  stop_words: tuple[str, ...], bad_words: tuple[str, ...], end_id: int | None,
                  pad_id: int | None, repetition_penalty: float | None, presence_penalty: float | None,
                  frequency_penalty: float | None, exclude_input_in_output: bool | None, wait_s: float,
                  timeout_s: float) -> None:
    """Send PROMPT to a running server and print the generated text."""
    from generator.serving.client import InferSettings, infer

    infer(InferSettings(
        prompt=prompt, url=url, protocol=protocol, model=model, stream=stream, max_tokens=max_tokens,
        temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop_words=stop_words,
        bad_words=bad_words, end_id=end_id, pad_id=pad_id, repetition_penalty=repetition_penalty,
        presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
        exclude_input_in_output=exclude_input_in_output, wait_s=wait_s, timeout_s=timeout_s))


@main.command("openai")
@click.option("--triton-url", default="localhost:8001", show_default=True, help="Triton gRPC host:port.")
@click.option("--tokenizer-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Tokenizer (chat template, token counts); default: the served preprocessing model's.")
@click.option("--chat-template", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A Jinja chat template instead of the tokenizer's own.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", type=int, default=9000, show_default=True, help="HTTP port of the API.")
@click.option("--max-body-bytes", type=int, default=4 << 20, show_default=True, help="Larger bodies get 413.")
@click.option("--max-json-depth", type=int, default=64, show_default=True, help="Deeper JSON bodies get 400.")
@click.option("--trust-remote-code", is_flag=True, help="Let the tokenizer run its own Python code.")
def openai_command(triton_url: str, tokenizer_dir: Path | None, chat_template: Path | None, host: str, port: int,
                   max_body_bytes: int, max_json_depth: int, trust_remote_code: bool) -> None:
    """OpenAI-compatible API (/v1/models, /v1/completions, /v1/chat/completions) in front of a running Triton."""
    from generator.serving.openai_server import OpenAISettings, run_openai

    run_openai(OpenAISettings(triton_url=triton_url, tokenizer_dir=tokenizer_dir, chat_template=chat_template,
                              host=host, port=port, max_body_bytes=max_body_bytes, max_json_depth=max_json_depth,
                              trust_remote_code=trust_remote_code))


@main.command("deploy")
@click.option("--model-repository", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The Triton repository to deploy (`<output>/triton_repo` of the whole job).")
@click.option("--output", "output_dir", required=True, type=click.Path(path_type=Path),
              help="Directory for the Dockerfile, compose.yaml, k8s/ manifests and README.md.")
@click.option("--image", default="gen-repo-triton:latest", show_default=True,
              help="Name of the image the Dockerfile builds (compose and Kubernetes run it).")
@click.option("--base-image", default=None,
              help="Image the Dockerfile starts FROM (default: nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3, "
              "TensorRT-LLM 1.2.1; engines must be built with the same TensorRT-LLM).")
@click.option("--gpus-per-node", type=int, default=None,
              help="GPUs per node (default: the whole world size on one node).")
@click.option("--nodes", type=int, default=None,
              help="Nodes (default: world size / GPUs per node); > 1 renders a LeaderWorkerSet.")
@click.option("--name", default="gen-repo", show_default=True, help="Compose project / Kubernetes object name.")
def deploy_command(model_repository: Path, output_dir: Path, image: str, base_image: str | None,
                   gpus_per_node: int | None, nodes: int | None, name: str) -> None:
    """Render a Dockerfile, a docker compose file and Kubernetes manifests for a repository."""
    from dataclasses import replace

    from generator.serving.deploy import DeploySettings, render_deploy

    settings = DeploySettings(model_repository=model_repository, output_dir=output_dir, image=image,
                              gpus_per_node=gpus_per_node, nodes=nodes, name=name)
    for path in render_deploy(replace(settings, base_image=base_image) if base_image else settings):
        click.echo(f"wrote {path}")


@main.command("render")
@click.option("--engine-dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Engine dir (config.json + rank files) from `gen-repo build` or trtllm-build.")
@click.option("--tokenizer-dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Tokenizer dir that preprocessing / postprocessing load.")
@click.option("--output", "output_dir", required=True, type=click.Path(path_type=Path),
              help="Triton model repository to write.")
@click.option("--engine", "engine_backend", type=click.Choice(ENGINE_BACKENDS), default=EngineOverrides.engine_backend,
              help="Engine backend (default: the engine dir's).")
@click.option("--max-batch-size", "triton_max_batch_size", type=int, default=EngineOverrides.triton_max_batch_size,
              help="Triton max_batch_size (default: the engine's).")
@click.option("--decoupled/--no-decoupled", default=Batching.decoupled, show_default=True,
              help="Decoupled tensorrt_llm / BLS (needed for streaming).")
@click.option("--preprocessing-instances", "preprocessing_instance_count", type=int,
              default=Batching.preprocessing_instance_count,
              help=f"Default: 2 for engines of max_input_len >= {LONG_INPUT_LEN} (render.LONG_INPUT_LEN), else 1.")
@click.option("--postprocessing-instances", "postprocessing_instance_count", type=int,
              default=Batching.postprocessing_instance_count, show_default=True)
@click.option("--bls-instances", "bls_instance_count", type=int, default=Batching.bls_instance_count,
              show_default=True)
@click.option("--max-queue-delay-us", "max_queue_delay_microseconds", type=int,
              default=Batching.max_queue_delay_microseconds, show_default=True)
@click.option("--max-queue-size", type=int, default=Batching.max_queue_size, show_default=True, help="0: unlimited.")
@click.option("--kv-cache-free-gpu-mem-fraction", type=float, default=TensorrtllmOptions.kv_cache_free_gpu_mem_fraction,
              show_default=True)
@click.option("--max-tokens-in-paged-kv-cache", type=int, default=TensorrtllmOptions.max_tokens_in_paged_kv_cache)
@click.option("--enable-kv-cache-reuse", is_flag=True)
@click.option("--enable-chunked-context", is_flag=True)
@click.option("--batching-strategy", type=click.Choice(BATCHING_STRATEGIES),
              default=TensorrtllmOptions.batching_strategy, show_default=True)
@click.option("--batch-scheduler-policy", type=click.Choice(BATCH_SCHEDULER_POLICIES),
              default=TensorrtllmOptions.batch_scheduler_policy, show_default=True)
@click.option("--gpu-device-ids", default=TensorrtllmOptions.gpu_device_ids,
              help="tensorrtllm: e.g. 0,1 (default: 0..world size-1).")
@click.option("--exclude-input-in-output", is_flag=True, help="Return only the generated text by default.")
@click.option("--add-special-tokens/--no-add-special-tokens", default=TextOptions.add_special_tokens,
              show_default=True)
@click.option("--skip-special-tokens/--no-skip-special-tokens", default=TextOptions.skip_special_tokens,
              show_default=True)
@click.option("--accumulate-tokens", is_flag=True, help="BLS streams the whole text so far, not deltas.")
@click.option("--trust-remote-code", is_flag=True, help="Let the tokenizer run its own Python code.")
@click.option("--model-name-prefix", default=RepositoryLayout.model_name_prefix, metavar="PREFIX",
              help="Name the models <PREFIX>preprocessing ... <PREFIX>ensemble, to serve several models from one "
                   "repository (other models already in --output stay).")
@click.option("--shared-pre-post-prefix", default=RepositoryLayout.shared_pre_post_prefix, metavar="PREFIX",
              help="Render no preprocessing/postprocessing; use <PREFIX>preprocessing/postprocessing already in "
                   "--output (same tokenizer files).")
def render_command(engine_dir: Path, tokenizer_dir: Path, output_dir: Path, **options: Any) -> None:
    """Write the Triton model repository for an engine dir, then validate it."""
    from generator.serving.render import render_repository

    repository = render_repository(RenderSettings.from_options(engine_dir, tokenizer_dir, output_dir, **options))
    click.echo(f"wrote {repository}")


@main.command("validate")
@click.argument("repository", type=click.Path(path_type=Path))
@click.option("--no-streaming", is_flag=True, help="Allow non-decoupled tensorrt_llm / BLS.")
def validate_command(repository: Path, no_streaming: bool) -> None:
    """Check a Triton model repository offline (configs, and the engine and tokenizer files they load); exit 1
    when it has problems."""
    from generator.serving.validate import validate_repository

    problems = validate_repository(repository, streaming=not no_streaming, deep=True)
    for problem in problems:
        click.echo(str(problem), err=True)
    if problems:
        click.echo(f"{len(problems)} problem(s) in {repository}", err=True)
        sys.exit(1)
    click.echo(f"{repository}: ok")


@main.command("eval")
@click.option("--url", default=None, help="gRPC host:port of a served repository: evaluate its ensemble.")
@click.option("--model", "served_model", default=EvalSettings.model, show_default=True, help="Served model to ask.")
@click.option("--engine-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Evaluate this pytorch engine dir directly (several ranks: `mpirun -n N gen-repo eval ...`).")
@click.option("--hf-model-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Also generate with transformers on this HF checkpoint, and compare.")
@click.option("--tokenizer-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Tokenizer for prompts and outputs (default: --hf-model-dir).")
@click.option("--dataset", default=None, metavar="FILE|NAME",
              help="Local .jsonl/.json/.parquet file, or a Hugging Face dataset name such as cnn_dailymail "
              "(needs `datasets` and the hub). Default: gen-repo's own set of 32 short news items.")
@click.option("--dataset-config", default=None, help="HF dataset config (cnn_dailymail: 3.0.0).")
@click.option("--dataset-split", default=EvalSettings.dataset_split, show_default=True, help="HF dataset split.")
@click.option("--article-field", default=EvalSettings.article_field, show_default=True,
              help="Field holding the article.")
@click.option("--summary-field", default=EvalSettings.summary_field, show_default=True,
              help="Field holding the reference.")
@click.option("--max-samples", type=int, default=None, help="Evaluate the first N samples (default: all; "
              "summarize.py's defaults give 20).")
@click.option("--max-input-len", type=int, default=None,
              help=f"Cut prompts to this many tokens, as summarize.py does (default: {EVAL_MAX_INPUT_LEN}, or the "
              "engine's limit).")
@click.option("--output-len", type=int, default=EvalSettings.output_len, show_default=True,
              help="Most new tokens per sample.")
@click.option("--batch-size", type=int, default=EvalSettings.batch_size, show_default=True,
              help="Requests in flight together (served and engine paths).")
@click.option("--hf-batch-size", type=int, default=EvalSettings.hf_batch_size, show_default=True,
              help="Prompts per transformers generate (left padding changes its numerics).")
@click.option("--prompt-template", default=EvalSettings.prompt_template, show_default=True,
              help="Prompt around {article} (summarize.py's summarize task by default).")
@click.option("--add-special-tokens/--no-add-special-tokens", default=EvalSettings.add_special_tokens,
              show_default=True)
@click.option("--temperature", type=float, default=EvalSettings.temperature, show_default=True)
@click.option("--top-k", type=int, default=EvalSettings.top_k, show_default=True,
              help="Greedy unless top-k > 1 or top-p > 0.")
@click.option("--top-p", type=float, default=EvalSettings.top_p, show_default=True)
@click.option("--seed", type=int, default=None, help="Sampling seed.")
@click.option("--end-id", type=int, default=None, help="Token id that ends generation (default: the tokenizer's eos).")
@click.option("--stemmer/--no-stemmer", "use_stemmer", default=EvalSettings.use_stemmer, show_default=True,
              help="Porter stemming in ROUGE (summarize.py's `evaluate` rouge metric does not stem).")
@click.option("--check-accuracy", is_flag=True, help="Exit 1 unless ROUGE-1 is above --rouge-threshold.")
@click.option("--rouge-threshold", type=float, default=EvalSettings.rouge_threshold, show_default=True,
              help="ROUGE-1 (x100) the engine paths must exceed with --check-accuracy.")
@click.option("--device", default=None, help="Device for the engine and transformers (default: cuda if present).")
@click.option("--hf-dtype", type=click.Choice(DTYPE_CHOICES),
              default=EvalSettings.hf_dtype, show_default=True,
              help="transformers dtype (auto: the engine's, else the checkpoint's).")
@click.option("--hf-device-map-auto", is_flag=True, help="Spread the transformers model over all GPUs.")
@click.option("--trust-remote-code", is_flag=True, help="Allow the checkpoint's / tokenizer's own Python code.")
@click.option("--wait", "wait_s", type=float, default=EvalSettings.wait_s, show_default=True,
              help="Wait up to this many seconds for the served model to be ready.")
@click.option("--timeout", "timeout_s", type=float, default=EvalSettings.timeout_s, show_default=True,
              help="Seconds to wait for one served answer.")
@click.option("--progress/--no-progress", default=EvalSettings.progress, show_default=True,
              help="Progress bars on stderr.")
@click.option("--json", "as_json", is_flag=True, help="Print the report (scores and every output) as JSON.")
def eval_command(served_model: str, as_json: bool, **options: Any) -> None:
    """ROUGE of a served repository / engine dir / transformers on summarization (TensorRT-LLM's summarize.py)."""
    from generator.bench.eval import evaluate, format_report, report_dict

    report = evaluate(EvalSettings(model=served_model, **options))
    if report is None:  # a rank > 0 of an mpirun launch
        return
    click.echo(json.dumps(report_dict(report), indent=2) if as_json else format_report(report))
    if not report.passed:
        sys.exit(1)


if __name__ == "__main__":
    main()
