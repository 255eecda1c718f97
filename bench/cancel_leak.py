"""Memory per 1,000 cancelled streams (issue 10 item 1): tritonserver on 127.0.0.1 serving a given repository,
N gRPC streams each cancelled after its first piece, resident memory of the server's session before / after,
and what the server log says about requests still in flight at shutdown.

    .venv/bin/python bench/cancel_leak.py --job-dir DIR [--count 1000] [--model ensemble] [--concurrency 4]

DIR holds triton_repo/ (and the engine / tokenizer it names), e.g. the output of `gen-repo --model tiny-mpt`.
Bounded: every stream waits at most 30 s for its first piece.
"""

from __future__ import annotations

import argparse
import queue
import re
import threading
import time
from pathlib import Path

import numpy as np

ERRORS: list[str] = []  # what came instead of a first piece


def cancelled_stream(url: str, model: str, max_tokens: int) -> bool:
    """One stream cancelled after its first response; True when that response came."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    results: queue.Queue[object] = queue.Queue()
    client = grpcclient.InferenceServerClient(url=url)
    client.start_stream(callback=lambda result, error: results.put(error or result))
    inputs = []
    for name, value in (("text_input", np.array([["What is machine learning?"]], dtype=object)),
                        ("max_tokens", np.array([[max_tokens]], dtype=np.int32)),
                        ("stream", np.array([[True]], dtype=bool))):
        tensor = grpcclient.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    client.async_stream_infer(model, inputs)
    try:
        first = results.get(timeout=30)
        if isinstance(first, Exception):
            ERRORS.append(str(first))
            return False
        return True
    except queue.Empty:
        ERRORS.append("no first piece within 30 s")
        return False
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()


def main() -> None:
    from generator.pipeline import PipelineResult
    from generator.serving.serve import stop_server
    from tests.conftest import start_test_server
    from tests.test_e2e_variants import session_rss_bytes

    parser = argparse.ArgumentParser()
    parser.add_argument("--job-dir", type=Path, required=True)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--model", default="ensemble")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    root = args.job_dir
    job = PipelineResult(output_dir=root, hf_dir=root / "hf", checkpoint_dir=root / "checkpoint",
                         engine_dir=root / "engine", tokenizer_dir=root / "tokenizer", triton_repo=root / "triton_repo")
    log_file = root / f"cancel-leak-{int(time.time())}.log"
    server, process = start_test_server(job, log_file)
    try:
        for _ in range(20):  # warm up: allocator pools, stubs' first requests
            cancelled_stream(server.grpc_url, args.model, args.max_tokens)
        time.sleep(2)
        before = session_rss_bytes(process.pid)
        started = time.monotonic()
        todo = list(range(args.count))
        answered = [0]
        lock = threading.Lock()

        def worker() -> None:
            while True:
                with lock:
                    if not todo:
                        return
                    todo.pop()
                if cancelled_stream(server.grpc_url, args.model, args.max_tokens):
                    with lock:
                        answered[0] += 1

        threads = [threading.Thread(target=worker) for _ in range(args.concurrency)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seconds = time.monotonic() - started
        time.sleep(5)  # let the cancellations land
        after = session_rss_bytes(process.pid)
    finally:
        stop_server(process, shm_prefix=server.shm_prefix)
    log = log_file.read_text(errors="replace")
    # tritonserver repeats the list every second of its exit timeout: the first one is enough
    in_flight = dict(re.findall(r"Model '([^']+)' \(version \d+\) has (\d+) in-flight inferences", log))
    per_1000 = (after - before) / max(args.count, 1) * 1000 / 2**20
    print(f"{args.model}: {args.count} cancelled streams in {seconds:.0f} s ({answered[0]} got a first piece); "
          f"server RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MiB ({per_1000:+.1f} MiB per 1,000); "
          f"in flight at shutdown: {in_flight or 'none'}")
    if ERRORS:
        print(f"{len(ERRORS)} without a first piece, e.g.: {ERRORS[0]}")


if __name__ == "__main__":
    main()
