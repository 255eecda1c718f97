"""The executor in a process of its own: `EngineProcess` for callers whose threads would compete for the GIL.

The Triton python model answers requests on threads of its stub process: building and sending responses,
polling cancellation, parsing new requests. With the step loop in that same process, those threads held the GIL
while the next step waited for it, and served throughput stayed near 0.73 of the engine alone. `EngineProcess`
has the `Executor`'s interface (`enqueue`, `cancel`, `shutdown`, `load`, `limits`) and runs the executor in a
child, `python -m generator.engine.process FD`, as vLLM v1's engine core and TensorRT-LLM's orchestrator mode do.

One socket pair carries everything: requests and cancels go down as they come; one message per step comes up
with all of that step's results, so the child's step loop pays one pickled write per step and no more. Request
ids are the parent's, so `enqueue` never waits on the child; it validates against the limits the child reported
when it was ready. If the child dies, every request in flight ends with an error result and `enqueue` raises:
no request is left without its final result.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from generator.engine.rank_env import child_environment
from generator.engine.requests import (
    Callback,
    GenerationRequest,
    GenerationResult,
    RequestLimits,
    validate_request,
)
from generator.errors import ConfigError, GenRepoError

log = logging.getLogger(__name__)

#: seconds between two reports of the executor's load while it is idle or between steps
_LOAD_PERIOD_S = 0.5

# message kinds, parent -> child
_ENQUEUE, _CANCEL, _SHUTDOWN = "enqueue", "cancel", "shutdown"
# message kinds, child -> parent
_READY, _FAILED, _RESULTS, _LOAD, _CLOSED = "ready", "failed", "results", "load", "closed"

#: one result on the wire: (request id, token ids, finished, finish reason, log probs, cum log prob, error,
#: scheduled_ns): a tuple pickles in a fraction of a dataclass's time
WireResult = tuple[int, list[int], bool, str | None, list[float] | None, float | None, str | None, int]


def _python() -> str:
    """The interpreter for the child: `python3` on PATH first, as the Triton stub finds its own (in the stub,
    `sys.executable` is the stub binary), else this interpreter."""
    executable = Path(sys.executable).name
    if executable.startswith("python"):
        return sys.executable
    return shutil.which("python3") or sys.executable


@dataclass(frozen=True)
class _Remote:
    """The callback the child's executor holds for one request: the parent's request id."""

    request_id: int

    def __call__(self, result: GenerationResult) -> None:  # results are sent per step by `_send_results`
        pass


class EngineProcess:
    """An `Executor` in a child process: `enqueue` from any thread, results come back through callbacks (called
    on this object's receiver thread, in the order the engine produced them)."""

    def __init__(self, engine_dir: Path | str, device: str | None = None, *,
                 on_exit: Callable[[str], None] | None = None, **executor_options: Any) -> None:
        """Start the child and wait until its executor is ready (weights loaded, KV pool sized, graphs captured).
        `executor_options` are `Executor`'s keyword arguments. `on_exit(reason)` is called (on the receiver
        thread, after every request in flight got its error result) if the child dies without being asked to
        stop. Raises ConfigError with the child's reason if it cannot start."""
        self.engine_dir = Path(engine_dir)
        parent_end, child_end = socket.socketpair()
        options = {"engine_dir": str(self.engine_dir), "device": device, **executor_options}
        self._process = subprocess.Popen(
            [_python(), "-m", "generator.engine.process", str(child_end.fileno()), json.dumps(options)],
            pass_fds=(child_end.fileno(),), env=child_environment())
        child_end.close()
        self._conn = Connection(parent_end.detach())
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._callbacks: dict[int, Callback] = {}
        self._ids = itertools.count(1)
        self._closed = False
        self._exit_reason: str | None = None
        self._load: tuple[int, int, float] = (0, 0, 0.0)
        self._on_exit = on_exit
        info = self._wait_ready()
        self.limits = RequestLimits(**info["limits"])
        self._receiver = threading.Thread(target=self._receive, name="gen-repo-engine-results", daemon=True)
        self._receiver.start()

    def _wait_ready(self) -> dict[str, Any]:
        try:
            message = self._conn.recv()
        except (EOFError, OSError):
            code = self._process.wait()
            raise ConfigError(f"the engine process exited with code {code} before it was ready "
                              f"(its error is in the log above)") from None
        if message[0] == _FAILED:
            self._process.wait()
            raise ConfigError(message[1])
        return dict(message[1])

    # the Executor's interface ------------------------------------------------------------------------------
    @property
    def load(self) -> tuple[int, int, float]:
        """(running requests, waiting requests, fraction of the KV pool's blocks in use), as last reported."""
        return self._load

    def enqueue(self, request: GenerationRequest, callback: Callback) -> int:
        """Queue a request; returns its id. Raises ValueError for a request the engine cannot take and
        RuntimeError once the engine process is gone."""
        validate_request(request, self.limits)
        with self._lock:
            if self._closed:
                raise RuntimeError(self._exit_reason or "the engine process is shut down")
            request_id = next(self._ids)
            self._callbacks[request_id] = callback
        try:
            self._send((_ENQUEUE, request_id, request))
        except OSError as error:
            with self._lock:
                self._callbacks.pop(request_id, None)
            raise RuntimeError(f"the engine process is gone: {error}") from error
        return request_id

    def cancel(self, request_id: int) -> None:
        """Stop a queued or running request; it finishes with reason "cancelled" at the child's next step."""
        try:
            self._send((_CANCEL, request_id))
        except OSError:
            pass  # the child is gone: the receiver ends every request in flight

    def shutdown(self, timeout: float = 120.0) -> None:
        """Finish queued and running requests as cancelled (their results still arrive), stop the child."""
        with self._lock:
            already = self._closed
            self._closed = True
        if not already:
            try:
                self._send((_SHUTDOWN,))
            except OSError:
                pass
        self._receiver.join(timeout)
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.error("the engine process did not stop in %.0f s: killing it", timeout)
            self._process.kill()
            self._process.wait()
        self._conn.close()

    def __enter__(self) -> EngineProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # plumbing -------------------------------------------------------------------------------------------------
    def _send(self, message: tuple[Any, ...]) -> None:
        with self._send_lock:
            self._conn.send(message)

    def _receive(self) -> None:
        """Hand each result to its request's callback until the child closes (or dies)."""
        try:
            while True:
                message = self._conn.recv()
                kind = message[0]
                if kind == _RESULTS:
                    self._load = message[2]
                    self._dispatch(message[1])
                elif kind == _LOAD:
                    self._load = message[1]
                elif kind == _CLOSED:
                    return
        except (EOFError, OSError):
            code = self._process.wait()
            self._exit_reason = f"the engine process exited with code {code}"
            log.error("%s", self._exit_reason)
        finally:
            self._end_all()
        if self._exit_reason is not None and self._on_exit is not None:
            self._on_exit(self._exit_reason)

    def _dispatch(self, results: list[WireResult]) -> None:
        for wire in results:
            request_id, finished = wire[0], wire[2]
            with self._lock:
                callback = self._callbacks.pop(request_id, None) if finished else self._callbacks.get(request_id)
            if callback is None:
                continue
            try:
                callback(GenerationResult(*wire))
            except Exception:  # noqa: BLE001 - a broken callback must not stop the other requests' results
                log.exception("callback of request %d raised", request_id)

    def _end_all(self) -> None:
        """The child is gone: every request still in flight gets its final result, an error."""
        with self._lock:
            self._closed = True
            left, self._callbacks = self._callbacks, {}
        reason = self._exit_reason or "the engine process shut down"
        for request_id, callback in left.items():
            try:
                callback(GenerationResult(request_id, [], True, "error", error=reason))
            except Exception:  # noqa: BLE001
                log.exception("callback of request %d raised", request_id)


# the child ------------------------------------------------------------------------------------------------------
def _to_wire(result: GenerationResult, request_id: int) -> WireResult:
    return (request_id, result.token_ids, result.finished, result.finish_reason, result.log_probs,
            result.cum_log_prob, result.error, result.scheduled_ns)


def serve(conn: Connection, options: dict[str, Any]) -> int:
    """The child's main: run an Executor for the parent on the other end of `conn` until it says shutdown
    or goes away."""
    from generator.engine.executor import Executor

    send_lock = threading.Lock()
    child_ids: dict[int, int] = {}  # the parent's request id -> the executor's, while it runs

    def send(message: tuple[Any, ...]) -> None:
        with send_lock:
            conn.send(message)

    def send_results(batch: list[tuple[Callback, GenerationResult]]) -> None:
        # on the step loop, once per step: the results of every request as one message
        wire = [_to_wire(result, callback.request_id) for callback, result in batch
                if isinstance(callback, _Remote)]
        for finished in (item for item in wire if item[2]):
            child_ids.pop(finished[0], None)
        if wire:
            try:
                send((_RESULTS, wire, executor.load))
            except OSError:
                pass  # the parent is gone: the reader below shuts the executor down

    try:
        engine_dir = options.pop("engine_dir")
        executor = Executor(engine_dir, result_sink=send_results, **options)
    except GenRepoError as error:  # bad input: the parent raises it as one line
        send((_FAILED, f"the engine could not start: {error}"))
        return 2
    except Exception as error:
        send((_FAILED, f"the engine could not start: {type(error).__name__}: {error}"))
        raise
    send((_READY, {"limits": dataclasses.asdict(executor.limits)}))
    last_load = executor.load
    try:
        while True:
            if not conn.poll(_LOAD_PERIOD_S):
                load = executor.load
                if load != last_load:  # the gauges of an idle engine must come back to zero
                    send((_LOAD, load))
                    last_load = load
                continue
            message = conn.recv()
            kind = message[0]
            if kind == _ENQUEUE:
                request_id, request = message[1], message[2]
                try:
                    child_ids[request_id] = executor.enqueue(request, _Remote(request_id))
                except (ValueError, RuntimeError) as error:  # the parent validated; the pool may have shrunk
                    send((_RESULTS, [(request_id, [], True, "error", None, None, str(error), 0)], executor.load))
            elif kind == _CANCEL:
                child_id = child_ids.pop(message[1], None)
                if child_id is not None:
                    executor.cancel(child_id)
            elif kind == _SHUTDOWN:
                break
    except (EOFError, OSError):
        pass  # the parent is gone: stop as if it had asked
    finally:
        executor.shutdown()  # the last results (cancelled) go out through send_results
        try:
            send((_CLOSED,))
        except OSError:
            pass
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="engine process: %(message)s")
    conn = Connection(int(args[0]))
    return serve(conn, json.loads(args[1]))


if __name__ == "__main__":
    sys.exit(main())
