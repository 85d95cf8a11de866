"""The fake Ollama server behaves like Ollama where jobvisor's tests rely on it."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.fakes.ollama import ERR_MAX_QUEUE, FakeOllama, FakeRequest, parse_keep_alive

REPO = Path(__file__).resolve().parent.parent
MODEL = "llava:7b"


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll a condition with a bound (no fixed sleeps)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


@pytest.fixture
def fake() -> Iterator[FakeOllama]:
    with FakeOllama(models=[MODEL, "llama3.1:8b"], slots=2) as server:
        yield server


def chat(base: str, model: str = MODEL, **extra: object) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hallo"}], "stream": False}
    body.update(extra)
    return httpx.post(base + "/api/chat", json=body, timeout=10)


class Gate:
    """A responder that holds every request in its slot until opened."""

    def __init__(self) -> None:
        self.opened = threading.Event()

    def __call__(self, req: FakeRequest) -> str | None:
        self.opened.wait(10)
        return None


def test_requests_beyond_the_slots_wait_instead_of_failing() -> None:
    gate = Gate()
    with FakeOllama(models=[MODEL], slots=2, responder=gate) as fake:
        results: list[int] = []
        threads = [threading.Thread(target=lambda: results.append(chat(fake.base_url).status_code))
                   for _ in range(5)]
        for t in threads:
            t.start()
        wait_until(lambda: fake.stats()["in_flight"] == 2 and fake.stats()["queued"] == 3)
        gate.opened.set()
        for t in threads:
            t.join(10)
        stats = fake.stats()
    assert results == [200] * 5
    assert stats["max_concurrent"] == 2
    assert stats["max_queued"] == 3
    assert stats["completed"] == 5
    assert stats["models"][MODEL]["max_concurrent"] == 2


def test_slots_are_per_model_like_ollama_num_parallel() -> None:
    gate = Gate()
    with FakeOllama(slots=1, responder=gate) as fake:
        threads = [threading.Thread(target=chat, args=(fake.base_url, m)) for m in ("a:1", "b:1")]
        for t in threads:
            t.start()
        wait_until(lambda: fake.stats()["in_flight"] == 2)
        gate.opened.set()
        for t in threads:
            t.join(10)
        assert fake.stats()["max_concurrent"] == 2


def test_a_full_queue_answers_503_server_busy() -> None:
    gate = Gate()
    with FakeOllama(models=[MODEL], slots=1, max_queue=1, responder=gate) as fake:
        first = threading.Thread(target=chat, args=(fake.base_url,))
        second = threading.Thread(target=chat, args=(fake.base_url,))
        first.start()
        wait_until(lambda: fake.stats()["in_flight"] == 1)
        second.start()
        wait_until(lambda: fake.stats()["queued"] == 1)
        third = chat(fake.base_url)
        gate.opened.set()
        first.join(10)
        second.join(10)
        assert fake.stats()["rejected_busy"] == 1
    assert third.status_code == 503
    assert third.json() == {"error": ERR_MAX_QUEUE}


def test_busy_slot_seconds_add_up_the_latency_of_each_request() -> None:
    with FakeOllama(models=[MODEL], slots=2, latency=0.05) as fake:
        for _ in range(4):
            assert chat(fake.base_url).status_code == 200
        stats = fake.stats()
    # Each request held its slot at least `latency` seconds (a lower bound only).
    assert stats["busy_slot_seconds"] >= 4 * 0.05
    assert stats["completed"] == 4


def test_chat_streams_ndjson_unless_stream_is_false(fake: FakeOllama) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "eins zwei drei"}]}
    streamed = httpx.post(fake.base_url + "/api/chat", json=body)
    assert streamed.headers["content-type"].startswith("application/x-ndjson")
    frames = [json.loads(line) for line in streamed.text.splitlines()]
    assert len(frames) >= 2
    assert all(f["done"] is False for f in frames[:-1])
    assert frames[-1]["done"] is True and frames[-1]["done_reason"] == "stop"
    assert "eval_count" in frames[-1] and "total_duration" in frames[-1]
    text = "".join(f["message"]["content"] for f in frames)

    single = httpx.post(fake.base_url + "/api/chat", json={**body, "stream": False}).json()
    assert single["done"] is True
    assert single["message"] == {"role": "assistant", "content": text}


def test_generate_streams_by_default_and_returns_response_field(fake: FakeOllama) -> None:
    streamed = httpx.post(fake.base_url + "/api/generate", json={"model": MODEL, "prompt": "hallo"})
    frames = [json.loads(line) for line in streamed.text.splitlines()]
    assert frames[-1]["done"] is True and "context" in frames[-1]
    single = httpx.post(fake.base_url + "/api/generate",
                        json={"model": MODEL, "prompt": "hallo", "stream": False}).json()
    assert single["response"] == "".join(f["response"] for f in frames)


def test_answers_are_deterministic_and_images_change_them(fake: FakeOllama) -> None:
    img = base64.b64encode(b"page one").decode()
    msg = {"role": "user", "content": "lies", "images": [img]}
    one = chat(fake.base_url, messages=[msg]).json()["message"]["content"]
    two = chat(fake.base_url, messages=[msg]).json()["message"]["content"]
    other = chat(fake.base_url, messages=[{**msg, "images": [base64.b64encode(b"x").decode()]}])
    assert one == two and one.startswith("OCR:")
    assert other.json()["message"]["content"] != one


def test_format_json_schema_gets_a_matching_object(fake: FakeOllama) -> None:
    schema = {"type": "object", "required": ["items", "n"], "properties": {
        "n": {"type": "integer", "minimum": 0, "maximum": 3},
        "items": {"type": "array", "items": {"type": "object", "required": ["name", "ok"],
                                             "properties": {"name": {"type": "string"},
                                                            "ok": {"type": "boolean"}}}}}}
    messages = [{"role": "user", "content": 'Bewerte ["Inhalt", "Form"] bitte'}]
    answer = json.loads(chat(fake.base_url, messages=messages, format=schema).json()["message"]["content"])
    assert 0 <= answer["n"] <= 3
    # One item per element of the JSON list in the prompt, the first string echoing it.
    assert [i["name"] for i in answer["items"]] == ["Inhalt", "Form"]
    plain = json.loads(chat(fake.base_url, format="json").json()["message"]["content"])
    assert isinstance(plain, dict)


def test_unknown_model_is_404_try_pulling_it_first(fake: FakeOllama) -> None:
    response = chat(fake.base_url, model="missing:1b")
    assert response.status_code == 404
    assert response.json() == {"error": 'model "missing:1b" not found, try pulling it first'}
    openai = httpx.post(fake.base_url + "/v1/chat/completions",
                        json={"model": "missing:1b", "messages": [{"role": "user", "content": "x"}]})
    assert openai.status_code == 404
    assert openai.json()["error"]["type"] == "not_found_error"


def test_a_name_without_tag_means_latest() -> None:
    with FakeOllama(models=["qwen2.5vl"]) as fake:
        assert chat(fake.base_url, model="qwen2.5vl:latest").status_code == 200
        assert chat(fake.base_url, model="qwen2.5vl").status_code == 200
        assert fake.calls(model="qwen2.5vl") == 2


def test_openai_chat_completions_shape(fake: FakeOllama) -> None:
    body = {"model": MODEL, "messages": [{"role": "system", "content": "s"},
                                         {"role": "user", "content": "hallo"}]}
    data = httpx.post(fake.base_url + "/v1/chat/completions", json=body).json()
    assert data["id"].startswith("chatcmpl-")
    assert data["object"] == "chat.completion"
    assert isinstance(data["created"], int)
    assert data["model"] == MODEL
    choice = data["choices"][0]
    assert choice["index"] == 0 and choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
    assert set(data["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}


def test_openai_stream_is_server_sent_events(fake: FakeOllama) -> None:
    body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "hallo"}]}
    text = httpx.post(fake.base_url + "/v1/chat/completions", json=body).text
    events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_dspy_style_prompt_gets_every_output_field(fake: FakeOllama) -> None:
    system = ("Your input fields are:\n1. `text` (str):\nYour output fields are:\n"
              "1. `feedback_md` (str): markdown\n2. `score` (int):\nAll interactions will ...\n"
              "[[ ## feedback_md ## ]]\n{feedback_md}\n\n[[ ## score ## ]]\n{score}\n\n"
              "[[ ## completed ## ]]")
    body = {"model": MODEL, "messages": [{"role": "system", "content": system},
                                         {"role": "user", "content": "[[ ## text ## ]]\nHallo"}]}
    content = httpx.post(fake.base_url + "/v1/chat/completions", json=body).json()[
        "choices"][0]["message"]["content"]
    assert "[[ ## feedback_md ## ]]" in content
    assert "[[ ## score ## ]]\n5" in content
    assert content.rstrip().endswith("[[ ## completed ## ]]")


@pytest.mark.parametrize(("fault", "status"), [("500", 500), ("503", 503), ("404", 404), ("400", 400)])
def test_status_faults_answer_with_ollama_error_bodies(fake: FakeOllama, fault: str, status: int) -> None:
    fake.inject(fault)
    response = chat(fake.base_url)
    assert response.status_code == status
    assert isinstance(response.json()["error"], str)
    assert chat(fake.base_url).status_code == 200  # count=1: only the next request


def test_faults_match_endpoint_and_model_and_count(fake: FakeOllama) -> None:
    fake.inject("503", count=2, endpoint="/api/chat", model="llama3.1:8b")
    assert chat(fake.base_url).status_code == 200  # other model
    assert httpx.post(fake.base_url + "/api/generate",
                      json={"model": "llama3.1:8b", "prompt": "x", "stream": False}).status_code == 200
    assert chat(fake.base_url, model="llama3.1:8b").status_code == 503
    assert chat(fake.base_url, model="llama3.1:8b").status_code == 503
    assert chat(fake.base_url, model="llama3.1:8b").status_code == 200
    assert fake.stats()["faults_applied"] == 2


def test_malformed_fault_sends_a_body_that_is_not_json(fake: FakeOllama) -> None:
    fake.inject("malformed")
    response = chat(fake.base_url)
    assert response.status_code == 200
    with pytest.raises(ValueError):
        response.json()


def test_drop_fault_closes_the_connection_without_an_answer(fake: FakeOllama) -> None:
    fake.inject("drop")
    with pytest.raises(httpx.RemoteProtocolError):
        chat(fake.base_url)
    assert chat(fake.base_url).status_code == 200


def test_slow_fault_holds_the_slot_past_the_client_timeout(fake: FakeOllama) -> None:
    fake.inject("slow", delay=5.0)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(fake.base_url + "/api/chat", timeout=httpx.Timeout(5.0, read=0.2),
                   json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": False})
    assert fake.stats()["in_flight"] == 1  # still "inferring" after the client gave up


def test_inject_rejects_unknown_faults(fake: FakeOllama) -> None:
    with pytest.raises(ValueError):
        fake.inject("explode")


def test_calls_count_by_endpoint_and_model_and_reset_clears(fake: FakeOllama) -> None:
    chat(fake.base_url)
    chat(fake.base_url, model="llama3.1:8b")
    httpx.post(fake.base_url + "/api/generate", json={"model": MODEL, "prompt": "x"})
    fake.inject("503", count=3)
    chat(fake.base_url)  # a faulted call still counts
    assert fake.calls() == 4
    assert fake.calls("/api/chat") == 3
    assert fake.calls("/api/chat", MODEL) == 2
    assert fake.calls(model=MODEL) == 3
    assert fake.stats()["calls"]["/api/generate"] == {MODEL: 1}
    fake.reset()
    assert fake.calls() == 0
    assert fake.stats()["faults_pending"] == 0
    assert chat(fake.base_url).status_code == 200


def test_tags_ps_version_and_keep_alive(fake: FakeOllama) -> None:
    assert httpx.get(fake.base_url + "/api/version").json()["version"]
    names = [m["name"] for m in httpx.get(fake.base_url + "/api/tags").json()["models"]]
    assert names == [MODEL, "llama3.1:8b"]
    assert httpx.get(fake.base_url + "/api/ps").json() == {"models": []}
    chat(fake.base_url, keep_alive="10m")
    loaded = httpx.get(fake.base_url + "/api/ps").json()["models"]
    assert [m["name"] for m in loaded] == [MODEL] and "expires_at" in loaded[0]
    unload = httpx.post(fake.base_url + "/api/chat", json={"model": MODEL, "messages": [], "keep_alive": 0})
    assert unload.json()["done_reason"] == "unload"
    assert httpx.get(fake.base_url + "/api/ps").json() == {"models": []}


def test_parse_keep_alive_follows_go_durations() -> None:
    assert parse_keep_alive("5m") == 300
    assert parse_keep_alive("1h30m") == 5400
    assert parse_keep_alive(-1) is None
    assert parse_keep_alive("0") == 0
    for bad in ("soon", "-1"):  # Go durations need a unit (only "0" may omit it)
        with pytest.raises(ValueError):
            parse_keep_alive(bad)


def test_bad_requests_are_400(fake: FakeOllama) -> None:
    bad_json = httpx.post(fake.base_url + "/api/chat", content=b"{nope")
    assert bad_json.status_code == 400 and "error" in bad_json.json()
    no_model = httpx.post(fake.base_url + "/api/chat", json={"messages": []})
    assert no_model.json() == {"error": "model is required"}
    unitless = chat(fake.base_url, keep_alive="-1")
    assert unitless.status_code == 400 and "missing unit" in unitless.json()["error"]


def test_control_api_drives_faults_stats_and_reset(fake: FakeOllama) -> None:
    control = fake.base_url + "/_fake"
    assert httpx.post(control + "/faults", json={"fault": "503", "count": 1}).json()["ok"] is True
    assert chat(fake.base_url).status_code == 503
    stats = httpx.get(control + "/stats").json()
    assert stats["calls"]["/api/chat"][MODEL] == 1
    assert httpx.post(control + "/faults", json={"fault": "nope"}).status_code == 400
    httpx.post(control + "/reset")
    assert httpx.get(control + "/stats").json()["calls_total"] == 0


def test_runs_as_a_separate_process() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.ollama", "--port", "0", "--slots", "3", "--latency", "0"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        base = proc.stdout.readline().strip()
        assert base.startswith("http://127.0.0.1:")
        assert httpx.get(base + "/api/version").status_code == 200
        assert chat(base, model="anything:1b").status_code == 200  # --models * = any
        assert httpx.get(base + "/_fake/stats").json()["slots"] == 3
    finally:
        proc.terminate()
        proc.wait(10)
