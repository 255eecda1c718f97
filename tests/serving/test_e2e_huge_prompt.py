"""Issue 10 item 5: a huge prompt is refused by its size before it is tokenized, and stalls nobody.

Tokenizing 8 MB takes seconds (7-13 s on 2 cores) and the single preprocessing instance serves requests one
batch at a time, so before the fix every request sent meanwhile waited too. A prompt of more bytes than
max_input_len of the tokenizer's longest tokens cannot fit, so preprocessing (and the OpenAI front) refuse it
from its size alone.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from generator.formats.tokenizer import load_tokenizer, longest_token_bytes
from generator.pipeline import PipelineResult
from generator.serving.openai_server import OpenAISettings
from generator.serving.render import LONG_INPUT_LEN, Batching, RenderSettings, render_repository
from generator.serving.serve import free_port
from generator.serving.triton_models.common import repository_max_input_len
from tests.conftest import RunningServer
from tests.serving.test_openai import _start_front
from tests.serving.test_render import load_config, make_engine_dir, make_tokenizer_dir

HUGE_PROMPT = "the cat sat on the mat. " * (8 * 1024 * 1024 // 24)  # 8 MB
QUICK_S = 2.0


def _engine_max_input_len(engine_dir: Path) -> int:
    return int(json.loads((engine_dir / "config.json").read_text())["build_config"]["max_input_len"])


def _post(url: str, body: dict[str, object], answers: dict[str, tuple[int, str, float]], key: str) -> None:
    """POST JSON; record (status, body text, seconds) under `key`."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    start = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            answers[key] = (response.status, response.read().decode(), time.monotonic() - start)
    except urllib.error.HTTPError as error:
        answers[key] = (error.code, error.read().decode(), time.monotonic() - start)


def test_the_byte_bound_never_refuses_a_prompt_that_fits(tiny_mpt_job: PipelineResult) -> None:
    tokenizer = load_tokenizer(tiny_mpt_job.tokenizer_dir)
    longest = longest_token_bytes(tokenizer)
    corpus = (Path(__file__).resolve().parents[2] / "generator" / "data" / "tiny_corpus.txt").read_text()
    for text in (corpus, corpus[:500], " " * 300, "\n\n\t" * 50, "é€😀" * 40, "<|endoftext|>" * 10):
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert len(ids) * longest >= len(text.encode()), text[:40]
    repo = tiny_mpt_job.triton_repo
    assert repository_max_input_len(repo / "preprocessing", None) == _engine_max_input_len(tiny_mpt_job.engine_dir)


@pytest.mark.parametrize(("max_input_len", "setting", "count"),
                         [(64, None, 1), (LONG_INPUT_LEN, None, 2), (LONG_INPUT_LEN, 1, 1), (64, 3, 3)])
def test_long_input_engines_get_a_second_preprocessing_instance(tmp_path: Path, max_input_len: int,
                                                                setting: int | None, count: int) -> None:
    engine = make_engine_dir(tmp_path / "engine")
    config = json.loads((engine / "config.json").read_text())
    config["build_config"]["max_input_len"] = max_input_len
    (engine / "config.json").write_text(json.dumps(config))
    repo = render_repository(RenderSettings(engine_dir=engine, tokenizer_dir=make_tokenizer_dir(tmp_path / "tok"),
                                            output_dir=tmp_path / "repo",
                                            batching=Batching(preprocessing_instance_count=setting)))
    assert [group.count for group in load_config(repo, "preprocessing").instance_group] == [count]
    assert repository_max_input_len(repo / "preprocessing", None) == max_input_len


@pytest.mark.server
@pytest.mark.parametrize("model", ["ensemble", "tensorrt_llm_bls"])
def test_an_8mb_prompt_is_refused_at_once_and_stalls_nobody(triton_server: RunningServer, model: str) -> None:
    url = f"http://{triton_server.http_url}/v2/models/{model}/generate"
    answers: dict[str, tuple[int, str, float]] = {}
    huge = threading.Thread(target=_post, args=(url, {"text_input": HUGE_PROMPT, "max_tokens": 4}, answers, "huge"))
    huge.start()
    time.sleep(0.05)  # the normal request is sent while the huge one is on its way
    _post(url, {"text_input": "the cat", "max_tokens": 4}, answers, "normal")
    huge.join(120)
    status, text, seconds = answers["huge"]
    limit = _engine_max_input_len(triton_server.job.engine_dir)
    assert status == 400, text
    assert f"more than {limit} tokens (the engine's max_input_len) can hold" in text
    assert seconds < QUICK_S, f"the 8 MB prompt took {seconds:.1f} s to be refused"
    status, text, seconds = answers["normal"]
    assert status == 200, text
    assert json.loads(text)["text_output"]
    assert seconds < QUICK_S, f"a normal request sent meanwhile took {seconds:.1f} s"


@pytest.mark.server
def test_the_openai_front_refuses_a_huge_prompt_without_tokenizing_it(triton_server: RunningServer) -> None:
    port = free_port()
    front = _start_front(OpenAISettings(triton_url=triton_server.grpc_url,
                                        tokenizer_dir=triton_server.job.tokenizer_dir, port=port))
    try:
        url = f"http://127.0.0.1:{port}/v1/completions"
        answers: dict[str, tuple[int, str, float]] = {}
        _post(url, {"model": "ensemble", "prompt": "the cat", "max_tokens": 2}, answers, "warm")  # loads the tokenizer
        assert answers["warm"][0] == 200, answers["warm"]
        _post(url, {"model": "ensemble", "prompt": HUGE_PROMPT[: 3 << 20], "max_tokens": 2}, answers, "huge")
    finally:
        front.stop()
    status, text, seconds = answers["huge"]
    assert status == 400, text
    assert "max_input_len" in json.loads(text)["error"]["message"]
    assert seconds < QUICK_S, f"the 3 MB prompt took {seconds:.1f} s to be refused"
