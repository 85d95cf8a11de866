"""The vision and feedback adapters against the fake Ollama server (in-process)."""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.fakes.ollama import FakeOllama, FakeRequest
from workers.core import model_gate
from workers.core.errors import PermanentError, TransientError
from workers.learning.ai import ollama
from workers.learning.ai.feedback import FeedbackSettings, feedback_backend, write_feedback
from workers.learning.ai.vision import VisionSettings, extract_text, vision_engine

REPO = Path(__file__).resolve().parent.parent
VISION = "qwen2.5vl:7b"
FEEDBACK = "llama3.1:8b"
# Distinctive, so a leak into logs or error messages is unmistakable.
STUDENT = "Mein Hamster Bartholomäus frisst heimlich Kirschkerne im Mondschein."
CRITERIA = ["Inhalt", "Sprache und Stil", "Struktur"]


@pytest.fixture
def fake() -> Iterator[FakeOllama]:
    with FakeOllama(models=[VISION, FEEDBACK], slots=2) as server:
        yield server


def vision_settings(fake: FakeOllama, **extra: object) -> VisionSettings:
    values: dict = {"base_url": fake.base_url, "model": VISION, "timeout": (2.0, 5.0)}
    values.update(extra)
    return VisionSettings(**values)


def feedback_settings(fake: FakeOllama, **extra: object) -> FeedbackSettings:
    values: dict = {"base_url": fake.base_url, "model": FEEDBACK, "timeout": (2.0, 10.0)}
    values.update(extra)
    return FeedbackSettings(**values)


def assert_criteria_v2(analysis: dict, criteria: list[str]) -> None:
    assert analysis["schema"] == "criteria.v2"
    assert [c["criterion"] for c in analysis["criteria"]] == criteria
    for item in analysis["criteria"]:
        assert isinstance(item["score"], int) and 0 <= item["score"] <= 10
        assert isinstance(item["comment"], str)


# --- vision -----------------------------------------------------------------------


def test_vision_ollama_sends_page_images_as_base64_and_returns_the_content(fake: FakeOllama) -> None:
    pages = [b"\x89PNG page one", b"\x89PNG page two"]
    text = extract_text(pages, engine="ollama", text_layer=None,
                        settings=vision_settings(fake, keep_alive="10m", options={"num_ctx": 8192}))
    assert text.startswith("OCR:")
    [request] = fake.requests("/api/chat")
    body = request["body"]
    assert body["model"] == VISION and body["stream"] is False and body["keep_alive"] == "10m"
    assert body["options"] == {"temperature": 0, "num_ctx": 8192}
    assert body["messages"][-1]["images"] == [base64.b64encode(p).decode() for p in pages]
    assert "wortgetreu" in body["messages"][-1]["content"]
    # Same pages, same text: the fake is deterministic, the adapter adds nothing.
    assert extract_text(pages, engine="ollama", text_layer=None, settings=vision_settings(fake)) == text


@pytest.mark.parametrize("fault", ["503", "500", "drop", "malformed"])
def test_vision_transient_failures_raise_the_retry_code(fake: FakeOllama, fault: str) -> None:
    fake.inject(fault)
    with pytest.raises(TransientError) as err:
        extract_text([b"img"], engine="ollama", text_layer=None, settings=vision_settings(fake))
    assert err.value.code == "vision_retrying"
    assert VISION in err.value.message


def test_vision_read_timeout_is_transient(fake: FakeOllama) -> None:
    fake.inject("slow", delay=5.0)
    with pytest.raises(TransientError) as err:
        extract_text([b"img"], engine="ollama", text_layer=None,
                     settings=vision_settings(fake, timeout=(2.0, 0.2)))
    assert err.value.code == "vision_retrying"
    assert "read timeout" in err.value.message


def test_vision_unreachable_server_is_transient() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = VisionSettings(base_url=f"http://127.0.0.1:{port}", model=VISION, timeout=(1.0, 1.0))
    with pytest.raises(TransientError) as err:
        extract_text([b"img"], engine="ollama", text_layer=None, settings=settings)
    assert err.value.code == "vision_retrying"


def test_vision_missing_model_is_permanent(fake: FakeOllama) -> None:
    with pytest.raises(PermanentError) as err:
        extract_text([b"img"], engine="ollama", text_layer=None,
                     settings=vision_settings(fake, model="not-pulled:3b"))
    assert err.value.code == "vision_failed"
    assert "404" in err.value.message


def test_vision_bad_request_is_permanent(fake: FakeOllama) -> None:
    fake.inject("400")
    with pytest.raises(PermanentError) as err:
        extract_text([b"img"], engine="ollama", text_layer=None, settings=vision_settings(fake))
    assert err.value.code == "vision_failed"


def test_vision_without_a_configured_model_fails_permanently(fake: FakeOllama) -> None:
    with pytest.raises(PermanentError, match="AI_VISION_MODEL"):
        extract_text([b"img"], engine="ollama", text_layer=None, settings=vision_settings(fake, model=""))
    assert fake.calls() == 0


def test_vision_stub_prefers_the_text_layer_else_a_stable_placeholder() -> None:
    settings = VisionSettings()
    assert extract_text([b"a"], engine="stub", text_layer=STUDENT, settings=settings) == STUDENT
    one = extract_text([b"a", b"b"], engine="stub", text_layer="  ", settings=settings)
    assert one == extract_text([b"a", b"b"], engine="stub", text_layer=None, settings=settings)
    assert one != extract_text([b"b", b"a"], engine="stub", text_layer=None, settings=settings)
    assert "2 pages" in one and one.lower().startswith("[placeholder")


def test_vision_tesseract_engine_delegates_to_ocr_tesseract(monkeypatch: pytest.MonkeyPatch) -> None:
    import workers.learning.ocr_tesseract as tess

    seen: list[tuple[list[bytes], str]] = []
    monkeypatch.setattr(tess, "ocr_images", lambda images, lang: seen.append((images, lang)) or "text")
    settings = VisionSettings(ocr_lang="deu")
    assert extract_text([b"png"], engine="tesseract", text_layer=None, settings=settings) == "text"
    assert seen == [([b"png"], "deu")]


@pytest.mark.parametrize(("env", "expected"), [
    ({}, "stub"),
    ({"AI_BACKEND": "stub"}, "stub"),
    ({"AI_BACKEND": "local"}, "ollama"),
    ({"AI_BACKEND": "local", "AI_VISION_BACKEND": "tesseract"}, "tesseract"),
    ({"AI_BACKEND": "stub", "AI_VISION_BACKEND": "ollama"}, "ollama"),
])
def test_vision_engine_from_env(monkeypatch: pytest.MonkeyPatch, env: dict, expected: str) -> None:
    for name in ("AI_BACKEND", "AI_VISION_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert vision_engine() == expected


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AI_KEEP_ALIVE", raising=False)
    monkeypatch.setenv("OLLAMA_BASE_URL", "http://ollama:11434/")
    monkeypatch.setenv("AI_VISION_MODEL", "qwen2.5vl:3b")
    monkeypatch.setenv("AI_CONNECT_TIMEOUT", "3")
    monkeypatch.setenv("AI_READ_TIMEOUT", "60")
    monkeypatch.setenv("AI_FEEDBACK_READ_TIMEOUT", "200")
    monkeypatch.setenv("AI_VISION_OPTIONS", '{"num_ctx": 4096}')
    vision = VisionSettings.from_env()
    assert vision.base_url == "http://ollama:11434" and vision.model == "qwen2.5vl:3b"
    assert vision.timeout == (3.0, 60.0) and vision.options == {"num_ctx": 4096}
    assert FeedbackSettings.from_env().timeout == (3.0, 200.0)
    assert vision.keep_alive is None
    monkeypatch.setenv("AI_KEEP_ALIVE", "-1")  # a number on the wire: Go rejects "-1"
    assert VisionSettings.from_env().keep_alive == -1
    monkeypatch.setenv("AI_KEEP_ALIVE", "30m")
    assert FeedbackSettings.from_env().keep_alive == "30m"
    monkeypatch.setenv("AI_VISION_OPTIONS", "[1]")
    with pytest.raises(ValueError, match="AI_VISION_OPTIONS"):
        VisionSettings.from_env()


# --- feedback ---------------------------------------------------------------------


def test_feedback_dspy_produces_criteria_v2_through_the_openai_endpoint(fake: FakeOllama) -> None:
    result = write_feedback(STUDENT, CRITERIA, backend="dspy", settings=feedback_settings(fake))
    assert result.backend_used == "dspy"
    assert result.feedback_md
    assert_criteria_v2(result.analysis, CRITERIA)
    assert fake.calls("/v1/chat/completions", FEEDBACK) == 1
    assert fake.calls() == 1  # nothing else: no fallback, no second adapter attempt
    [request] = fake.requests("/v1/chat/completions")
    assert "[[ ## analysis ## ]]" in request["body"]["messages"][0]["content"]
    from dspy.clients.base_lm import GLOBAL_HISTORY

    # DSPy's call history would keep student text in memory for the process's life.
    assert not any("Bartholomäus" in json.dumps(h, default=str) for h in GLOBAL_HISTORY)


def test_feedback_dspy_passes_the_options_openai_can_express(fake: FakeOllama) -> None:
    options = {"temperature": 0.2, "num_predict": 700, "stop": ["###"], "num_ctx": 8192}
    result = write_feedback(STUDENT, CRITERIA, backend="dspy",
                            settings=feedback_settings(fake, options=options))
    assert result.backend_used == "dspy"
    [request] = fake.requests("/v1/chat/completions")
    body = request["body"]
    assert body["temperature"] == 0.2 and body["max_tokens"] == 700 and body["stop"] == ["###"]
    assert "num_ctx" not in json.dumps(body)


def test_feedback_dspy_jobs_run_in_parallel_threads(
    fake: FakeOllama, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without the model gate (AI_MODEL_LIMIT=off): the threads' own parallelism.
    monkeypatch.setenv("AI_MODEL_LIMIT", "off")
    model_gate.reset()
    fake.latency = 0.05  # long enough for the threads to overlap at the fake
    settings = feedback_settings(fake)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(
            lambda i: write_feedback(f"{STUDENT} ({i})", CRITERIA, backend="dspy", settings=settings),
            range(6)))
    assert [r.backend_used for r in results] == ["dspy"] * 6
    for result in results:
        assert_criteria_v2(result.analysis, CRITERIA)
    assert fake.calls("/v1/chat/completions") == 6 and fake.calls() == 6
    assert fake.stats()["max_concurrent"] == 2  # the fake's slots, not a client-side lock


def test_feedback_dspy_child_talks_only_to_ollama(fake: FakeOllama) -> None:
    """In a fresh interpreter (as a feedback child): importing DSPy and running it
    opens no connection but the one to the configured Ollama, even with
    OLLAMA_BASE_URL set (which would steer DSPy's "auto" engine to LiteLLM)."""
    script = r"""
import json, socket, sys
seen = []
real_connect = socket.socket.connect
def connect(self, address):
    seen.append(list(address[:2]) if isinstance(address, tuple) else str(address))
    return real_connect(self, address)
socket.socket.connect = connect
real_gai = socket.getaddrinfo
def getaddrinfo(host, *args, **kwargs):
    seen.append(["dns", str(host)])
    return real_gai(host, *args, **kwargs)
socket.getaddrinfo = getaddrinfo
from workers.learning.ai.feedback import FeedbackSettings, write_feedback
settings = FeedbackSettings.from_env()
result = write_feedback("Ein kurzer Text.", ["Inhalt"], backend="dspy", settings=settings)
print(json.dumps({"seen": seen, "backend": result.backend_used, "dspy": "dspy" in sys.modules}))
"""
    env = {k: v for k, v in os.environ.items() if not k.endswith(("_API_KEY", "_API_BASE"))}
    env.update(PYTHONPATH=str(REPO), OLLAMA_BASE_URL=fake.base_url, AI_FEEDBACK_MODEL=FEEDBACK,
               AI_CONNECT_TIMEOUT="2", AI_READ_TIMEOUT="10")
    env.pop("LITELLM_LOCAL_MODEL_COST_MAP", None)  # the adapter must set it itself
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["backend"] == "dspy" and report["dspy"] is True
    allowed = {("127.0.0.1", fake.port), ("dns", "127.0.0.1")}
    assert report["seen"], "expected at least the connection to the fake"
    assert {tuple(s) for s in report["seen"]} <= allowed
    assert fake.calls("/v1/chat/completions") == 1 and fake.calls() == 1


@pytest.mark.parametrize("fault", ["malformed"])
def test_feedback_falls_back_to_direct_ollama_when_dspy_fails(
    fake: FakeOllama, caplog: pytest.LogCaptureFixture, fault: str
) -> None:
    fake.inject(fault, endpoint="/v1/chat/completions")
    caplog.set_level(logging.DEBUG)
    result = write_feedback(STUDENT, CRITERIA, backend="dspy", settings=feedback_settings(fake))
    assert result.backend_used == "ollama"
    assert_criteria_v2(result.analysis, CRITERIA)
    assert fake.calls("/v1/chat/completions") == 1
    assert fake.calls("/api/chat", FEEDBACK) == 1
    [direct] = fake.requests("/api/chat")
    assert direct["body"]["format"]["type"] == "object" and direct["body"]["stream"] is False
    warnings = [r for r in caplog.records if r.name == "jobvisor.ai" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].getMessage() == "feedback_dspy_failed"
    assert warnings[0].error_class  # type: ignore[attr-defined]
    for record in caplog.records:  # no logger, DSPy's included, saw the student's text
        assert "Bartholomäus" not in record.getMessage()
        assert "Bartholomäus" not in json.dumps(vars(record), default=str)


@pytest.mark.parametrize("fault", ["503", "500", "drop", "slow"])
def test_feedback_dspy_server_failure_is_a_retry_not_a_second_request(
    fake: FakeOllama, caplog: pytest.LogCaptureFixture, fault: str
) -> None:
    """Issue #16: a busy (503), broken (500), vanished or slow server is not helped by
    a second request to it on /api/chat: the job is retried by the queue with backoff."""
    fake.inject(fault, endpoint="/v1/chat/completions", delay=3.0 if fault == "slow" else 0.0)
    caplog.set_level(logging.DEBUG)
    settings = feedback_settings(fake, timeout=(2.0, 1.0))
    with pytest.raises(TransientError) as raised:
        write_feedback(STUDENT, CRITERIA, backend="dspy", settings=settings)
    assert raised.value.code == "feedback_retrying"
    expected = {"503": "busy (503)", "500": "down (500)", "drop": "down", "slow": "timeout"}
    assert f"model server {expected[fault]}," in str(raised.value)
    assert fake.calls("/v1/chat/completions") == 1
    assert fake.calls("/api/chat") == 0
    assert not [r for r in caplog.records if r.getMessage() == "feedback_dspy_failed"]
    assert "Bartholomäus" not in str(raised.value)


def test_feedback_dspy_parse_failure_falls_back(fake: FakeOllama, caplog: pytest.LogCaptureFixture) -> None:
    def unparseable_on_v1(req: FakeRequest) -> str | None:
        return "Ich weiß es nicht." if req.endpoint == "/v1/chat/completions" else None

    fake.responder = unparseable_on_v1
    caplog.set_level(logging.WARNING)
    result = write_feedback(STUDENT, CRITERIA, backend="dspy", settings=feedback_settings(fake))
    assert result.backend_used == "ollama"
    # ChatAdapter once (no JSONAdapter retry: it would cost an inference), then our call.
    assert fake.calls("/v1/chat/completions") == 1
    assert fake.calls("/api/chat") == 1
    [warning] = [r for r in caplog.records if r.name == "jobvisor.ai"]
    assert warning.error_class == "AdapterParseError"  # type: ignore[attr-defined]
    assert all("Bartholomäus" not in json.dumps(vars(r), default=str) for r in caplog.records)


def test_feedback_missing_model_is_permanent(fake: FakeOllama) -> None:
    with pytest.raises(PermanentError) as err:
        write_feedback(STUDENT, CRITERIA, backend="dspy",
                       settings=feedback_settings(fake, model="not-pulled:1b"))
    assert err.value.code == "feedback_failed"
    assert "Bartholomäus" not in str(err.value)


def test_feedback_direct_answer_that_is_not_json_is_transient(fake: FakeOllama) -> None:
    fake.responder = lambda req: f"Sorry: {STUDENT}"  # a model echoing the text, not JSON
    with pytest.raises(TransientError) as err:
        write_feedback(STUDENT, CRITERIA, backend="ollama", settings=feedback_settings(fake))
    assert err.value.code == "feedback_retrying"
    assert "Bartholomäus" not in str(err.value)


def test_feedback_ollama_backend_skips_dspy(fake: FakeOllama) -> None:
    result = write_feedback(STUDENT, CRITERIA, backend="ollama", settings=feedback_settings(fake))
    assert result.backend_used == "ollama"
    assert_criteria_v2(result.analysis, CRITERIA)
    assert fake.calls("/v1/chat/completions") == 0 and fake.calls("/api/chat") == 1


def test_feedback_keeps_requested_names_when_the_model_paraphrases(fake: FakeOllama) -> None:
    answer = {"feedback_md": "Gut.", "criteria": [
        {"criterion": "inhalt", "score": 7.6, "comment": "ok"},
        {"criterion": "Sprachlicher Stil", "score": 14, "comment": "sehr gut"},
        {"criterion": "Aufbau", "score": -2, "comment": "fehlt"},
    ]}
    fake.responder = lambda req: json.dumps(answer)
    result = write_feedback(STUDENT, CRITERIA, backend="ollama", settings=feedback_settings(fake))
    assert [(c["criterion"], c["score"]) for c in result.analysis["criteria"]] == [
        ("Inhalt", 8), ("Sprache und Stil", 10), ("Struktur", 0)]


def test_feedback_answer_missing_a_criterion_is_transient(fake: FakeOllama) -> None:
    fake.responder = lambda req: json.dumps({"feedback_md": "x", "criteria": [
        {"criterion": "Inhalt", "score": 5, "comment": ""}]})
    with pytest.raises(TransientError):
        write_feedback(STUDENT, CRITERIA, backend="ollama", settings=feedback_settings(fake))


def test_feedback_stub_is_deterministic_and_needs_no_model() -> None:
    settings = FeedbackSettings(base_url="http://127.0.0.1:9", model="")
    one = write_feedback(STUDENT, ["Hamster und Kirschkerne", "Rechtschreibung"], backend="stub",
                         settings=settings)
    two = write_feedback(STUDENT, ["Hamster und Kirschkerne", "Rechtschreibung"], backend="stub",
                         settings=settings)
    assert one == two and one.backend_used == "stub"
    assert_criteria_v2(one.analysis, ["Hamster und Kirschkerne", "Rechtschreibung"])
    scores = [c["score"] for c in one.analysis["criteria"]]
    assert scores[0] > scores[1]  # the criterion whose words the text uses scores higher
    assert "Bartholomäus" not in one.feedback_md
    empty = write_feedback("", ["Inhalt"], backend="stub", settings=settings)
    assert empty.analysis["criteria"][0]["score"] == 0


def test_feedback_stub_marks_its_markdown_as_a_placeholder() -> None:
    result = write_feedback(STUDENT, CRITERIA, backend="stub", settings=FeedbackSettings())
    assert result.feedback_md.startswith("> **Platzhalter")
    assert "Automatische Platzhalter" not in result.feedback_md.splitlines()[-1]


@pytest.mark.parametrize(("language", "says", "not_says"), [
    ("de", "auf Deutsch", "in English"),
    ("en", "in English", "auf Deutsch"),
])
def test_feedback_language_reaches_the_direct_ollama_prompt(
        fake: FakeOllama, language: str, says: str, not_says: str) -> None:
    result = write_feedback(STUDENT, CRITERIA, backend="ollama",
                            settings=feedback_settings(fake, language=language))
    assert_criteria_v2(result.analysis, CRITERIA)
    [request] = fake.requests("/api/chat")
    system, user = request["body"]["messages"]
    assert system["role"] == "system" and says in system["content"]
    assert not_says not in system["content"]
    assert user["content"].startswith("Criteria (JSON)" if language == "en" else "Kriterien (JSON)")
    assert json.dumps(CRITERIA, ensure_ascii=False) in user["content"]


@pytest.mark.parametrize(("language", "says", "not_says"), [
    ("de", "auf Deutsch", "in English"),
    ("en", "in English", "auf Deutsch"),
])
def test_feedback_language_reaches_the_dspy_instructions(
        fake: FakeOllama, language: str, says: str, not_says: str) -> None:
    result = write_feedback(STUDENT, CRITERIA, backend="dspy",
                            settings=feedback_settings(fake, language=language))
    assert result.backend_used == "dspy"
    [request] = fake.requests("/v1/chat/completions")
    system = request["body"]["messages"][0]["content"]
    assert says in system and not_says not in system
    assert ("Markdown, English" if language == "en" else "Markdown, Deutsch") in system


def test_feedback_without_a_configured_model_fails_permanently(fake: FakeOllama) -> None:
    with pytest.raises(PermanentError, match="AI_FEEDBACK_MODEL"):
        write_feedback(STUDENT, CRITERIA, backend="dspy", settings=feedback_settings(fake, model=""))


@pytest.mark.parametrize(("env", "expected"), [
    ({}, "stub"),
    ({"AI_BACKEND": "local"}, "dspy"),
    ({"AI_BACKEND": "local", "AI_FEEDBACK_BACKEND": "ollama"}, "ollama"),
    ({"AI_FEEDBACK_BACKEND": "dspy"}, "dspy"),
])
def test_feedback_backend_from_env(monkeypatch: pytest.MonkeyPatch, env: dict, expected: str) -> None:
    for name in ("AI_BACKEND", "AI_FEEDBACK_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert feedback_backend() == expected


def test_unknown_backend_names_are_config_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AI_BACKEND", "cloud")
    with pytest.raises(ValueError, match="AI_BACKEND"):
        feedback_backend()
    monkeypatch.setenv("AI_FEEDBACK_BACKEND", "gpt")
    with pytest.raises(ValueError, match="AI_FEEDBACK_BACKEND"):
        feedback_backend()


def test_ollama_chat_error_messages_carry_no_prompt(fake: FakeOllama) -> None:
    fake.inject("500")
    with pytest.raises(TransientError) as err:
        ollama.chat(fake.base_url, FEEDBACK, [{"role": "user", "content": STUDENT}],
                    retry_code="x_retrying", fail_code="x_failed")
    assert err.value.code == "x_retrying"
    assert err.value.message == f"ollama 500, model={FEEDBACK}"
