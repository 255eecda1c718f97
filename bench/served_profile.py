"""Where does served time go? Serve a random MPT-shaped model and drive the `ensemble` at fixed concurrencies.

One run, one machine: the whole job (convert -> build -> render) on a random MPT checkpoint, a real tritonserver,
then a closed-loop load of `--concurrency` gRPC streams to `ensemble` (`stream: true`, `min_tokens = max_tokens` so
every request yields exactly `--output-len` tokens), several client processes so the client is never the limit.
Per level: output tok/s, TTFT and ITL p50/p99. With `--profile-level C`, py-spy records the python-backend stubs
and `top` samples every process's CPU while level C runs. `--engine` also runs `gen-repo bench` (engine alone) at
the same batch sizes in the same run, `--hf` transformers' `generate` (run with an interpreter that imports it).

    source .device-bundle/setup.sh
    python3 bench/served_profile.py --work /tmp/sp --hidden 4096 --layers 32 --heads 32 --vocab 50432 \
        --dtype bfloat16 --concurrency 1 32 256 --profile-level 256 --out $OUT
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_tp_parity import write_random_mpt  # noqa: E402

from generator.pipeline import PipelineSettings, run_pipeline  # noqa: E402
from generator.serving.serve import ServeSettings, free_port, start_server, stop_server, wait_until_ready  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--requests-per-level", type=int, default=0, help="0: 4 x concurrency (at least 16) up to 64 streams, 2 x above")
    parser.add_argument("--clients", type=int, default=4, help="client processes")
    parser.add_argument("--max-batch-size", type=int, default=256)
    parser.add_argument("--profile-level", type=int, nargs="*", default=[])
    parser.add_argument("--profile-seconds", type=int, default=12)
    parser.add_argument("--engine", action="store_true", help="also gen-repo bench (engine alone)")
    parser.add_argument("--model-name", default="ensemble")
    parser.add_argument("--keep-serving", action="store_true")
    parser.add_argument("--response-threads", type=int, nargs="*", default=[],
                        help="serve once per value (tensorrt_llm's response_threads parameter), same job")
    parser.add_argument("--variants", nargs="*", default=[],
                        help="serve once per variant, same job: comma-separated tensorrt_llm parameters, e.g. "
                             "engine_process=false engine_process=true, and postprocessing_instances=N")
    parser.add_argument("--postprocessing-batching", action="store_true",
                        help="serve once more with `dynamic_batching {}` on postprocessing, as NVIDIA's template "
                             "has it (we render it without: a cancelled ensemble stream leaks in 2.51)")
    return parser.parse_args()


def _prompt_text(rng: np.random.Generator, words: int) -> str:
    vocab = ["alpha", "beta", "gamma", "delta", "model", "serve", "token", "batch", "cache", "engine", "triton"]
    return " ".join(vocab[i] for i in rng.integers(0, len(vocab), words))


def client_worker(url: str, model: str, concurrency: int, total: int, output_len: int, input_words: int,
                  seed: int, results: Any, go: Any) -> None:
    """Closed loop: keep `concurrency` requests in flight on one gRPC stream until `total` have finished."""
    import tritonclient.grpc as grpcclient

    rng = np.random.default_rng(seed)
    events: queue.Queue[Any] = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: events.put((time.perf_counter(), result, error)))
    state: dict[str, dict[str, Any]] = {}
    sent = 0

    def send() -> None:
        nonlocal sent
        request_id = f"{seed}-{sent}"
        sent += 1
        inputs = []
        for name, value, dtype in (("text_input", np.array([[_prompt_text(rng, input_words)]], dtype=object), "BYTES"),
                                   ("max_tokens", np.array([[output_len]], dtype=np.int32), "INT32"),
                                   ("min_tokens", np.array([[output_len]], dtype=np.int32), "INT32"),
                                   ("stream", np.array([[True]], dtype=bool), "BOOL")):
            tensor = grpcclient.InferInput(name, list(value.shape), dtype)
            tensor.set_data_from_numpy(value)
            inputs.append(tensor)
        state[request_id] = {"start": time.perf_counter(), "times": []}
        client.async_stream_infer(model, inputs, request_id=request_id, enable_empty_final_response=True)

    client.is_server_ready()  # connect before the clock starts
    go.wait()
    first = time.perf_counter()
    for _ in range(min(concurrency, total)):
        send()
    done: list[dict[str, Any]] = []
    errors = 0
    messages: list[str] = []  # the first few errors' texts, to tell a rejected input from a fault
    while len(done) + errors < total:
        now, result, error = events.get(timeout=900)
        if error is not None:
            errors += 1
            if len(messages) < 5:
                messages.append(str(error))
            if sent < total:
                send()
            continue
        response = result.get_response()
        entry = state[response.id]
        final = response.parameters.get("triton_final_response")
        if response.outputs:
            entry["times"].append(now)
        if final is not None and final.bool_param:
            done.append({"start": entry["start"], "times": entry["times"]})
            del state[response.id]
            if sent < total:
                send()
    client.stop_stream()
    client.close()
    results.put({"done": done, "errors": errors, "error_messages": messages, "first": first,
                 "last": time.perf_counter()})


def requests_for(concurrency: int, args: argparse.Namespace) -> int:
    """A level's request count: `--requests-per-level`, else 4 x streams (at least 16) up to 64 streams, 2 x above."""
    return args.requests_per_level or (max(16, 4 * concurrency) if concurrency <= 64 else 2 * concurrency)


def run_level(url: str, model: str, concurrency: int, args: argparse.Namespace) -> dict[str, Any]:
    total = requests_for(concurrency, args)
    clients = min(args.clients, concurrency)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    go = ctx.Event()
    procs = []
    for c in range(clients):
        share = concurrency // clients + (1 if c < concurrency % clients else 0)
        count = total // clients + (1 if c < total % clients else 0)
        proc = ctx.Process(target=client_worker, args=(url, model, share, count, args.output_len,
                                                       args.input_len // 2, 1000 * concurrency + c, results, go))
        proc.start()
        procs.append(proc)
    time.sleep(3.0)  # clients import and connect
    go.set()
    gathered = [results.get(timeout=1800) for _ in procs]
    elapsed = max(g["last"] for g in gathered) - min(g["first"] for g in gathered)
    for proc in procs:
        proc.join()
    done = [d for g in gathered for d in g["done"]]
    errors = sum(g["errors"] for g in gathered)
    error_messages = [m for g in gathered for m in g["error_messages"]][:5]
    ttft = [d["times"][0] - d["start"] for d in done if d["times"]]
    itl = [(d["times"][-1] - d["times"][0]) / (len(d["times"]) - 1) for d in done if len(d["times"]) > 1]
    # per token, as AIPerf counts it: a response may carry several tokens when responses fall behind the engine
    itl_token = [(d["times"][-1] - d["times"][0]) / (args.output_len - 1) for d in done
                 if d["times"] and args.output_len > 1]
    responses = sum(len(d["times"]) for d in done)

    def pct(values: list[float], q: float) -> float:
        return round(1000 * float(np.percentile(values, q)), 2) if values else float("nan")

    return {"concurrency": concurrency, "requests": len(done), "errors": errors, "seconds": round(elapsed, 2),
            "output_tok_s": round(len(done) * args.output_len / elapsed, 1),
            "responses_per_request": round(responses / max(1, len(done)), 1),
            "responses_per_s": round(responses / elapsed, 1),
            "ttft_ms_p50": pct(ttft, 50), "ttft_ms_p99": pct(ttft, 99),
            "itl_ms_p50": pct(itl, 50), "itl_ms_p99": pct(itl, 99),  # between responses
            "itl_token_ms_p50": pct(itl_token, 50), "itl_token_ms_p99": pct(itl_token, 99),
            "error_messages": error_messages}


def stub_pids(server_pid: int) -> dict[str, int]:
    """pid of each python-backend stub of our server (not of other servers on the machine), by model name."""
    found = {}
    out = subprocess.run(["ps", "-eo", "pid,ppid,args"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if "triton_python_backend_stub" in line:
            pid, ppid, rest = line.strip().split(None, 2)
            if int(ppid) != server_pid:
                continue
            for part in rest.split():
                if "/" in part and part.endswith(".py"):
                    found[Path(part).parent.parent.name] = int(pid)
    for line in out.splitlines():  # the engine process the `tensorrt_llm` stub started (engine_process true)
        pid, ppid, rest = (line.strip().split(None, 2) + ["", ""])[:3]
        if "generator.engine.process" in rest and int(ppid) in found.values():
            found["engine_process"] = int(pid)
    return found


def profile(args: argparse.Namespace, server_pid: int, level: int) -> dict[str, Any]:
    """py-spy every stub and sample per-process CPU while a level runs (in background threads)."""
    pids = stub_pids(server_pid)
    procs = []
    for name, pid in pids.items():
        tag = f"-{args.profile_tag}" if getattr(args, "profile_tag", None) else ""
        out = args.out / f"pyspy-{level}{tag}-{name}.txt"
        procs.append(subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--threads", "--idle", "-f", "raw",
                                       "-d", str(args.profile_seconds), "-r", "50", "-o", str(out)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    top = subprocess.Popen(["top", "-b", "-d", "2", "-n", str(max(2, args.profile_seconds // 2)), "-H", "-w", "200"],
                           stdout=open(args.out / f"top-{level}{tag}.txt", "w"), stderr=subprocess.DEVNULL)
    return {"pids": pids, "server_pid": server_pid, "procs": procs + [top]}


def serve_levels(args: argparse.Namespace, repo: Path, report: dict[str, Any], threads: int | None,
                 variant: str | None = None) -> None:
    """Start a server on `repo`, run every concurrency level (profiling the chosen ones), stop it."""
    ports = [free_port() for _ in range(3)]
    args.profile_tag = (variant or "").replace(",", "_").replace("=", "")
    backends = os.environ.get("TRITON_BACKENDS")
    extra = (f"--backend-directory={backends}",) if backends else ()
    settings = ServeSettings(model_repository=repo, http_port=ports[0], grpc_port=ports[1],
                             metrics_port=ports[2], master_port=free_port(), extra_args=extra)
    process, log_file = start_server(settings)
    first_level = len(report["served"])
    try:
        wait_until_ready(process, "127.0.0.1", ports[0], 900.0, log_file)
        url = f"127.0.0.1:{ports[1]}"
        run_level(url, args.model_name, 1, argparse.Namespace(**{**vars(args), "requests_per_level": 2}))
        for concurrency in args.concurrency:
            if concurrency in args.profile_level:
                timer = threading.Timer(2.0, lambda c=concurrency: report.setdefault("prof", profile(args, process.pid, c)))
                timer.start()
            level = run_level(url, args.model_name, concurrency, args)
            level["response_threads"] = threads
            level["variant"] = variant
            report["served"].append(level)
            print("served", json.dumps(level), flush=True)
            (args.out / "served_profile.json").write_text(json.dumps(report, indent=2, default=str))
            prof = report.pop("prof", None)
            if prof:
                for p in prof["procs"]:
                    p.wait(timeout=120)
                report[f"profiled_pids_{concurrency}"] = prof["pids"]
    finally:
        if not args.keep_serving:
            stop_server(process)
        if any(level["errors"] for level in report["served"][first_level:]):  # the server's side of the failures
            name = "-".join(part for part in ("tritonserver", args.profile_tag, str(threads or "")) if part)
            with contextlib.suppress(OSError):
                shutil.copy(log_file, args.out / f"{name}.log")


def run_engine_alone(args: argparse.Namespace, engine_dir: Path, report: dict[str, Any]) -> None:
    """`gen-repo bench` on the served engine's limits, sending what the served clients send: first all of a level's
    streams at once (`engine`), then per level the served load itself, a closed loop of that many streams over the
    level's request count (`engine_closed_loop`)."""
    limits = json.loads((engine_dir / "config.json").read_text())["build_config"]
    common = [sys.executable, "-m", "generator.bench.engine", "--hidden", str(args.hidden), "--layers",
              str(args.layers), "--heads", str(args.heads), "--vocab", str(args.vocab), "--dtype", args.dtype,
              "--input-len", str(args.input_len), "--output-len", str(args.output_len),
              "--max-batch-size", str(limits["max_batch_size"]), "--max-input-len", str(limits["max_input_len"]),
              "--max-seq-len", str(limits["max_seq_len"]), "--max-num-tokens", str(limits["max_num_tokens"]),
              "--end-id", "0", "--min-tokens", str(args.output_len)]  # as the served requests: fixed length
    runs = [("engine", ["--batch-sizes", ",".join(map(str, args.concurrency))])]
    for concurrency in args.concurrency:
        requests = requests_for(concurrency, args)
        runs.append((f"engine_closed_loop_{concurrency}",
                     ["--batch-sizes", str(concurrency), "--closed-loop", str(requests)]))
    for name, extra in runs:
        cmd = common + extra + ["--json", str(args.out / f"{name}.json")]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=False)
        if (args.out / f"{name}.json").is_file():
            result = json.loads((args.out / f"{name}.json").read_text())
            if name == "engine":
                report["engine"] = result
            else:
                report.setdefault("engine_closed_loop", []).extend(result["results"])


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    hf_dir = args.work / "hf"
    write_random_mpt(hf_dir, args)
    out = args.work / "job"
    result = run_pipeline(PipelineSettings(
        model=str(hf_dir), output_dir=out, dtype=args.dtype, max_batch_size=args.max_batch_size,
        max_input_len=2 * args.input_len, max_seq_len=2 * args.input_len + args.output_len,
        progress=False))  # headroom: a prompt of input_len / 2 random words reached 193 tokens once in 14,000
    report: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "served": []}
    config_path = result.triton_repo / "tensorrt_llm" / "config.pbtxt"
    original = config_path.read_text()
    for threads in args.response_threads or ([] if args.variants else [None]):
        if threads is not None:  # tensorrt_llm's response_threads parameter, appended to the rendered config
            config_path.write_text(original + f'parameters: {{ key: "response_threads", value: {{ string_value: '
                                              f'"{threads}" }} }}\n')
        serve_levels(args, result.triton_repo, report, threads)
    post_path = result.triton_repo / "postprocessing" / "config.pbtxt"
    post_original = post_path.read_text()
    for variant in args.variants:
        # tensorrt_llm parameters, appended to the rendered config; `postprocessing_instances` edits that model's
        # instance count
        settings = dict(pair.split("=", 1) for pair in variant.split(","))
        instances = settings.pop("postprocessing_instances", None)
        post_path.write_text(post_original if instances is None else
                             re.sub(r"count: \d+", f"count: {int(instances)}", post_original, count=1))
        extra = "".join(f'parameters: {{ key: "{key}", value: {{ string_value: "{value}" }} }}\n'
                        for key, value in settings.items())
        config_path.write_text(original + extra)
        serve_levels(args, result.triton_repo, report, None, variant)
    config_path.write_text(original)
    post_path.write_text(post_original)
    if args.postprocessing_batching:
        post_config = result.triton_repo / "postprocessing" / "config.pbtxt"
        post_original = post_config.read_text()
        post_config.write_text(post_original + "dynamic_batching {\n}\n")
        report["served_postprocessing_batching_from"] = len(report["served"])
        serve_levels(args, result.triton_repo, report, None)
        post_config.write_text(post_original)
    if args.engine:
        run_engine_alone(args, result.engine_dir, report)
    (args.out / "served_profile.json").write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(report["served"], indent=1))


if __name__ == "__main__":
    main()
