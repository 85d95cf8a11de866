"""The learning pipeline (pdf → vision → feedback) with real worker processes and a fake Ollama.

Model calls are counted at the fake, per model: `VISION` and `FEEDBACK` are the two
model names the workers are configured with. Backoffs that a test needs to observe
are long (30 s) and ended by the test itself (`_release_backoff`), so nothing here
depends on how fast the machine is.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pymupdf
import pytest
from psycopg.types.json import Jsonb

from tests.fakes.ollama import FakeOllama
from tests.helpers import counts, start_worker, stop, wait_for
from workers.core import queue as q
from workers.learning.ocr_tesseract import tesseract_available
from workers.learning.pdf_render import render_pdf
from workers.learning.storage import DerivedPaths, LocalStorage

VISION = "vision-test:latest"
FEEDBACK = "feedback-test:latest"
CRITERIA = ["Struktur und Gliederung", "Argumentation"]
# Stands for the student's text: it must never show up in a worker's log.
MARKER = "Geheimnisvolle Kastanienallee"
FAST = ("--poll", "0.2", "--backoff", "0.1", "--max-backoff", "0.5")
SLOW_RETRY = ("--poll", "0.2", "--backoff", "30", "--max-backoff", "60")
REPO = Path(__file__).resolve().parent.parent


# --- fixtures and builders ------------------------------------------------------------


@pytest.fixture
def fake() -> Iterator[FakeOllama]:
    with FakeOllama(slots=4) as server:
        yield server


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "storage")


@pytest.fixture
def env(worker_env: dict[str, str], storage: LocalStorage, fake: FakeOllama) -> dict[str, str]:
    """Stub AI by default; tests switch stages to the fake Ollama with `_ollama(env)`."""
    out = {k: v for k, v in worker_env.items() if not k.startswith(("AI_", "OLLAMA_"))}
    return out | {"STORAGE_DIR": str(storage.root), "AI_BACKEND": "stub",
                  "OLLAMA_BASE_URL": fake.base_url, "AI_VISION_MODEL": VISION,
                  "AI_FEEDBACK_MODEL": FEEDBACK, "AI_READ_TIMEOUT": "60"}


def _ollama(env: dict[str, str], vision: str = "ollama", feedback: str = "ollama"
            ) -> dict[str, str]:
    return env | {"AI_BACKEND": "local", "AI_VISION_BACKEND": vision,
                  "AI_FEEDBACK_BACKEND": feedback}


class Workers:
    """Worker processes of one test: all stopped at teardown, each must exit 0."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen] = []

    def start(self, env: dict[str, str], job_type: str, *args: str) -> subprocess.Popen:
        log = self.tmp_path / f"{job_type}-{len(self.procs)}.log"
        proc = start_worker(env, job_type, *args, log=log)
        self.procs.append(proc)
        return proc

    def logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.tmp_path.glob("*.log"))

    def stop_all(self) -> list[int]:
        codes = [stop(p) for p in self.procs]
        self.procs = []
        return codes


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    w = Workers(tmp_path)
    try:
        yield w
    finally:
        assert all(code == 0 for code in w.stop_all())


def make_pdf(*pages: str) -> bytes:
    doc = pymupdf.open()
    for text in pages:
        doc.new_page().insert_text((72, 72), text, fontsize=12)
    return doc.tobytes()


def add_submission(db: psycopg.Connection, storage: LocalStorage, data: bytes, *,
                   mime: str = "application/pdf", owner: str = "alice",
                   status: str = "pending", text: str | None = None) -> str:
    sid = str(uuid.uuid4())
    key = f"submissions/{sid}/source"
    storage.write(key, data)
    db.execute(
        "INSERT INTO learning_submissions (id, owner_sub, source_key, mime_type, criteria,"
        " analysis_status, text_body) VALUES (%s, %s, %s, %s, %s, %s, %s)",
        (sid, owner, key, mime, Jsonb(CRITERIA), status, text))
    return sid


def enqueue_pdf(db: psycopg.Connection, sid: str, owner: str = "alice") -> int:
    return q.enqueue(db, q.NewJob("pdf", {"submission_id": sid, "owner_sub": owner},
                                  key=f"pdf:{sid}", max_attempts=3))


def enqueue_vision(db: psycopg.Connection, storage: LocalStorage, sid: str, data: bytes, *,
                   owner: str = "alice", max_attempts: int = 5) -> int:
    """The vision job the pdf stage would enqueue for `data`."""
    render = render_pdf(data, storage)
    payload = {"submission_id": sid, "owner_sub": owner, "page_keys": render.page_keys,
               "stitched_key": render.stitched_key, "content_hash": render.content_hash,
               "text_layer_key": DerivedPaths(render.content_hash).text_layer}
    return q.enqueue(db, q.NewJob("vision", payload, key=f"vision:{sid}",
                                  max_attempts=max_attempts))


def enqueue_feedback(db: psycopg.Connection, sid: str, *, owner: str = "alice",
                     max_attempts: int = 5) -> int:
    return q.enqueue(db, q.NewJob("feedback", {"submission_id": sid, "owner_sub": owner},
                                  key=f"feedback:{sid}", max_attempts=max_attempts))


def submission(db: psycopg.Connection, sid: str) -> dict[str, Any]:
    with db.cursor(row_factory=psycopg.rows.dict_row) as cur:
        return cur.execute("SELECT * FROM learning_submissions WHERE id = %s", (sid,)).fetchone()


def status_of(db: psycopg.Connection, sid: str) -> tuple[str, str | None]:
    row = submission(db, sid)
    return row["analysis_status"], row["error_code"]


def job_by_key(db: psycopg.Connection, key: str) -> dict[str, Any] | None:
    row = db.execute("SELECT id FROM jobvisor.jobs WHERE idempotency_key = %s ORDER BY id DESC"
                     " LIMIT 1", (key,)).fetchone()
    return q.get_job(db, row[0]) if row else None


def _release_backoff(db: psycopg.Connection, job_id: int, job_type: str) -> None:
    """End a retry's backoff now and wake the workers (the test observed the wait)."""
    db.execute("UPDATE jobvisor.jobs SET visible_at = now() WHERE id = %s AND status = 'queued'",
               (job_id,))
    db.execute("SELECT pg_notify('jobvisor_jobs', %s)", (job_type,))


def _finished(db: psycopg.Connection, sid: str) -> bool:
    return status_of(db, sid)[0] in ("completed", "failed")


# --- the happy path ----------------------------------------------------------------------


def test_submission_goes_pending_extracted_completed_and_no_worker_logs_its_text(
        db, env, storage, workers):
    sid = add_submission(db, storage, make_pdf(f"Mein Aufsatz über die {MARKER}.",
                                               "Zweite Seite mit Argumenten."))
    pdf_job = enqueue_pdf(db, sid)
    assert status_of(db, sid) == ("pending", None)
    # Without a feedback worker the submission stops where vision leaves it.
    workers.start(env, "pdf", *FAST)
    workers.start(env, "vision", *FAST)
    wait_for(lambda: status_of(db, sid)[0] == "extracted", what="extracted")
    row = submission(db, sid)
    assert MARKER in row["text_body"] and row["extracted_at"] is not None
    assert row["feedback_md"] is None and row["finished_at"] is None
    # The stub engine used the PDF's own text: real text, and the row says where it came from.
    assert (row["text_backend"], row["feedback_backend"]) == ("text_layer", None)

    pdf_result = q.get_job(db, pdf_job)["result"]
    assert pdf_result["pages"] == 2
    vision_job = q.get_job(db, pdf_result["vision_job"])
    assert vision_job["idempotency_key"] == f"vision:{sid}"
    assert len(vision_job["payload"]["page_keys"]) == 2
    assert MARKER not in json.dumps(vision_job["payload"])  # text stays out of the queue
    feedback_job = job_by_key(db, f"feedback:{sid}")
    assert feedback_job["status"] == "queued"

    workers.start(env, "feedback", *FAST)
    wait_for(lambda: _finished(db, sid), what="completed")
    row = submission(db, sid)
    assert (row["analysis_status"], row["error_code"]) == ("completed", None)
    assert row["feedback_md"].strip() and row["finished_at"] is not None
    analysis = row["analysis_json"]
    assert analysis["schema"] == "criteria.v2"
    assert [c["criterion"] for c in analysis["criteria"]] == CRITERIA
    assert (row["text_backend"], row["feedback_backend"]) == ("text_layer", "stub")
    assert row["feedback_md"].startswith("> **Platzhalter")  # says so, at the top
    assert workers.stop_all() == [0, 0, 0]
    logs = workers.logs()
    assert "submission_rendered" in logs and "feedback_written" in logs
    assert MARKER not in logs


def test_photo_submission_is_read_by_the_vision_model(db, env, storage, fake, workers):
    pix = pymupdf.Pixmap(pymupdf.csRGB, pymupdf.IRect(0, 0, 64, 48), False)
    pix.clear_with(200)
    sid = add_submission(db, storage, pix.tobytes("png"), mime="image/png")
    enqueue_pdf(db, sid)
    env = _ollama(env, feedback="stub")
    for job_type in ("pdf", "vision", "feedback"):
        workers.start(env, job_type, *FAST)
    wait_for(lambda: _finished(db, sid), what="photo submission finished")
    row = submission(db, sid)
    assert row["analysis_status"] == "completed"
    assert row["text_body"].startswith("OCR:")  # the fake's answer for an image
    assert fake.calls("/api/chat", VISION) == 1
    assert (row["text_backend"], row["feedback_backend"]) == ("ollama", "stub")


# --- concurrency ---------------------------------------------------------------------------


def test_three_queued_vision_jobs_with_concurrency_two_run_two_at_once(
        db, env, storage, fake, workers):
    gate = threading.Event()

    def hold(_request: Any) -> None:  # every model call waits until the test lets go
        gate.wait(60)

    fake.responder = hold
    sids = []
    for i in range(3):
        data = make_pdf(f"Aufsatz {i}")
        sids.append(add_submission(db, storage, data))
        enqueue_vision(db, storage, sids[-1], data)
    # The threads' own parallelism, without the model gate's limit (issue #16).
    workers.start(_ollama(env) | {"AI_MODEL_LIMIT": "off"}, "vision", "--concurrency", "2", *FAST)
    try:
        wait_for(lambda: fake.stats()["in_flight"] == 2, what="two model calls in flight")
        assert counts(db, "vision") == {"leased": 2, "queued": 1}
    finally:
        gate.set()
    wait_for(lambda: all(status_of(db, s)[0] == "extracted" for s in sids),
             what="all three extracted")
    stats = fake.stats()
    assert stats["models"][VISION]["max_concurrent"] == 2
    assert stats["in_flight"] == 0 and fake.calls("/api/chat", VISION) == 3
    assert counts(db, "vision") == {"completed": 3}


def test_transient_vision_error_backs_off_only_its_job_while_the_other_commits(
        db, env, storage, fake, workers):
    a = add_submission(db, storage, make_pdf("Erster Aufsatz"))
    b = add_submission(db, storage, make_pdf("Zweiter Aufsatz"))
    jobs = {a: enqueue_vision(db, storage, a, make_pdf("Erster Aufsatz")),
            b: enqueue_vision(db, storage, b, make_pdf("Zweiter Aufsatz"))}
    fake.inject("503", count=1, model=VISION)
    workers.start(_ollama(env), "vision", "--concurrency", "2", *SLOW_RETRY)

    def one_extracted_one_retrying() -> tuple[str, str] | None:
        states = {s: status_of(db, s) for s in (a, b)}
        done = [s for s, st in states.items() if st == ("extracted", None)]
        waiting = [s for s, st in states.items() if st == ("pending", "vision_retrying")]
        return (done[0], waiting[0]) if len(done) == 1 and len(waiting) == 1 else None

    done, waiting = wait_for(one_extracted_one_retrying, what="one extracted, one retrying")
    job = q.get_job(db, jobs[waiting])
    assert (job["status"], job["attempts"], job["error_code"]) == ("queued", 1, "vision_retrying")
    assert q.get_job(db, jobs[done])["status"] == "completed"

    _release_backoff(db, jobs[waiting], "vision")
    wait_for(lambda: status_of(db, waiting) == ("extracted", None), what="retry succeeding")
    assert q.get_job(db, jobs[waiting])["attempts"] == 2
    assert fake.calls("/api/chat", VISION) == 3


# --- OCR reuse ---------------------------------------------------------------------------


def test_extracted_submission_with_text_is_not_read_again(db, env, storage, fake, workers):
    sid = add_submission(db, storage, make_pdf("egal"), status="extracted",
                         text="Schon erkannter Text über Bäume.")
    vision_job = enqueue_vision(db, storage, sid, make_pdf("egal"))
    env = _ollama(env)
    workers.start(env, "vision", *FAST)
    workers.start(env, "feedback", *FAST)
    wait_for(lambda: _finished(db, sid), what="submission finished")
    row = submission(db, sid)
    assert row["analysis_status"] == "completed"
    assert row["text_body"] == "Schon erkannter Text über Bäume."
    assert (row["text_backend"], row["feedback_backend"]) == (None, "ollama")
    assert fake.calls("/api/chat", VISION) == 0
    assert fake.calls("/api/chat", FEEDBACK) == 1
    assert q.get_job(db, vision_job)["result"]["reused_text"] is True


def test_extracted_submission_without_text_is_read_and_its_text_stored(
        db, env, storage, fake, workers):
    sid = add_submission(db, storage, make_pdf("egal"), status="extracted", text=None)
    vision_job = enqueue_vision(db, storage, sid, make_pdf("egal"))
    workers.start(_ollama(env), "vision", *FAST)
    wait_for(lambda: q.get_job(db, vision_job)["status"] == "completed", what="vision done")
    row = submission(db, sid)
    assert row["analysis_status"] == "extracted" and row["text_body"].startswith("OCR:")
    assert fake.calls("/api/chat", VISION) == 1
    assert job_by_key(db, f"feedback:{sid}")["status"] == "queued"


def test_feedback_failing_twice_then_succeeding_makes_exactly_one_vision_call(
        db, env, storage, fake, workers):
    sid = add_submission(db, storage, make_pdf("Text"))
    enqueue_vision(db, storage, sid, make_pdf("Text"))
    fake.inject("503", count=2, model=FEEDBACK)
    env = _ollama(env)
    workers.start(env, "vision", *FAST)
    workers.start(env, "feedback", *SLOW_RETRY)
    for attempt in (1, 2):
        job = wait_for(lambda a=attempt: (j := job_by_key(db, f"feedback:{sid}"))
                       and j["status"] == "queued" and j["attempts"] == a and j,
                       what=f"feedback attempt {attempt} failing")
        assert job["error_code"] == "feedback_retrying"
        # The text stays; only the failed step waits to run again.
        assert status_of(db, sid) == ("extracted", "feedback_retrying")
        _release_backoff(db, job["id"], "feedback")
    wait_for(lambda: _finished(db, sid), what="submission finished")
    assert status_of(db, sid) == ("completed", None)
    assert job_by_key(db, f"feedback:{sid}")["attempts"] == 3
    assert fake.calls("/api/chat", VISION) == 1
    assert fake.calls("/api/chat", FEEDBACK) == 3
    row = submission(db, sid)
    assert (row["text_backend"], row["feedback_backend"]) == ("ollama", "ollama")


def test_dspy_parse_failure_falls_back_to_the_direct_call_and_completes(
        db, env, storage, fake, workers):
    sid = add_submission(db, storage, make_pdf("x"), status="extracted",
                         text="Ein Text, der Feedback braucht.")
    job = enqueue_feedback(db, sid)

    def unparseable_on_v1(req: Any) -> str | None:
        return "Ich weiß es nicht." if req.endpoint == "/v1/chat/completions" else None

    fake.responder = unparseable_on_v1
    workers.start(_ollama(env, feedback="dspy"), "feedback", *FAST)
    wait_for(lambda: _finished(db, sid), timeout=120, what="submission finished")
    assert status_of(db, sid) == ("completed", None)
    result = q.get_job(db, job)["result"]
    assert result["backend"] == "ollama" and result["schema"] == "criteria.v2"
    # What produced it, not what was configured: DSPy failed, the direct call answered.
    assert submission(db, sid)["feedback_backend"] == "ollama"
    assert fake.calls("/v1/chat/completions") == 1
    assert fake.calls("/api/chat", FEEDBACK) == 1
    assert '"feedback_dspy_failed"' in workers.logs()


def test_a_busy_model_server_is_retried_with_backoff_not_asked_twice_at_once(
        db, env, storage, fake, workers):
    """Issue #16: two 503s from DSPy's /v1: two retries by the queue (attempt 3 answers),
    no fallback request to the same busy server, and the shared limit counted them."""
    sid = add_submission(db, storage, make_pdf("x"), status="extracted",
                         text="Ein Text, der Feedback braucht.")
    job = enqueue_feedback(db, sid)
    fake.inject("503", count=2, endpoint="/v1/chat/completions")
    workers.start(_ollama(env, feedback="dspy"), "feedback", *FAST)
    wait_for(lambda: _finished(db, sid), timeout=120, what="submission finished")
    assert status_of(db, sid) == ("completed", None)
    done = q.get_job(db, job)
    assert done["attempts"] == 3 and done["result"]["backend"] == "dspy"
    assert fake.calls("/v1/chat/completions") == 3 and fake.calls("/api/chat") == 0
    assert '"feedback_dspy_failed"' not in workers.logs()
    wait_for(lambda: db.execute("SELECT busy, requests FROM jobvisor.model_limits "
                                "WHERE model = %s", (FEEDBACK,)).fetchone() == (2, 3),
             what="the busy answers counted in jobvisor.model_limits")


# --- failures ----------------------------------------------------------------------------


def _encrypted_pdf() -> bytes:
    doc = pymupdf.open()
    doc.new_page().insert_text((72, 72), MARKER)
    return doc.tobytes(encryption=pymupdf.PDF_ENCRYPT_AES_256, user_pw="u", owner_pw="o")


@pytest.mark.parametrize("data", [
    pytest.param(b"%PDF-1.7\n" + b"\x00garbage" * 50, id="corrupt"),
    pytest.param(_encrypted_pdf(), id="encrypted"),
    pytest.param(make_pdf("x")[:200], id="truncated"),
])
def test_unreadable_pdf_fails_the_submission_with_pdf_invalid(db, env, storage, workers, data):
    sid = add_submission(db, storage, data)
    job = enqueue_pdf(db, sid)
    workers.start(env, "pdf", *FAST)
    wait_for(lambda: _finished(db, sid), what="submission failed")
    assert status_of(db, sid) == ("failed", "pdf_invalid")
    row = q.get_job(db, job)
    assert (row["status"], row["error_code"], row["attempts"]) == ("failed", "pdf_invalid", 1)
    assert job_by_key(db, f"vision:{sid}") is None
    assert MARKER not in workers.logs()


def test_missing_source_fails_the_submission_with_pdf_source_missing(db, env, storage, workers):
    sid = add_submission(db, storage, make_pdf("x"))
    storage.delete_prefix(f"submissions/{sid}/")
    enqueue_pdf(db, sid)
    workers.start(env, "pdf", *FAST)
    wait_for(lambda: _finished(db, sid), what="submission failed")
    assert status_of(db, sid) == ("failed", "pdf_source_missing")


@pytest.mark.parametrize(("fault", "count", "max_attempts", "attempts"), [
    pytest.param("404", 1, 3, 1, id="permanent"),
    pytest.param("503", 2, 2, 2, id="retries-exhausted"),
])
def test_vision_failure_fails_the_submission_with_vision_failed(
        db, env, storage, fake, workers, fault, count, max_attempts, attempts):
    sid = add_submission(db, storage, make_pdf("x"))
    job = enqueue_vision(db, storage, sid, make_pdf("x"), max_attempts=max_attempts)
    fake.inject(fault, count=count, model=VISION)
    workers.start(_ollama(env), "vision", *FAST)
    wait_for(lambda: _finished(db, sid), what="submission failed")
    assert status_of(db, sid) == ("failed", "vision_failed")
    row = q.get_job(db, job)
    assert (row["status"], row["attempts"]) == ("failed", attempts)
    assert job_by_key(db, f"feedback:{sid}") is None


@pytest.mark.parametrize(("fault", "count", "max_attempts"), [
    pytest.param("400", 1, 3, id="permanent"),
    pytest.param("503", 2, 2, id="retries-exhausted"),
])
def test_feedback_failure_fails_the_submission_and_an_operator_retry_completes_it(
        db, env, storage, fake, workers, fault, count, max_attempts):
    sid = add_submission(db, storage, make_pdf("Text"))
    enqueue_vision(db, storage, sid, make_pdf("Text"))
    fake.inject(fault, count=count, model=FEEDBACK)
    env = _ollama(env)
    workers.start(env, "vision", *FAST, "--max-attempts", str(max_attempts))
    workers.start(env, "feedback", *FAST)
    wait_for(lambda: _finished(db, sid), what="submission failed")
    assert status_of(db, sid) == ("failed", "feedback_failed")
    row = submission(db, sid)
    assert row["text_body"] and row["feedback_md"] is None

    # `jobvisor jobs retry`: the submission reopens where the failed stage starts.
    assert q.retry_failed(db, job_by_key(db, f"feedback:{sid}")["id"])
    assert status_of(db, sid) == ("extracted", None)
    wait_for(lambda: _finished(db, sid), what="submission completed after retry")
    assert status_of(db, sid) == ("completed", None)
    assert fake.calls("/api/chat", VISION) == 1


def test_an_unknown_feedback_language_fails_feedback_naming_the_variable(
        db, env, storage, workers):
    sid = add_submission(db, storage, make_pdf("x"), status="extracted", text="Ein Text.")
    job = enqueue_feedback(db, sid)
    workers.start(env | {"AI_FEEDBACK_LANGUAGE": "fr"}, "feedback", *FAST)
    wait_for(lambda: _finished(db, sid), what="submission failed")
    assert status_of(db, sid) == ("failed", "feedback_failed")
    row = q.get_job(db, job)
    assert (row["status"], row["attempts"]) == ("failed", 1)  # configuration: permanent
    assert "AI_FEEDBACK_LANGUAGE" in row["error_message"]
    assert submission(db, sid)["feedback_backend"] is None


# --- how job outcomes reach the submission (the trigger, no workers) ----------------------


def _lease(db: psycopg.Connection, job_type: str) -> q.LeasedJob:
    (job,) = q.lease(db, job_type, 1, worker_id="test", lease_seconds=30)
    return job


def test_retries_mark_the_stage_retrying_and_only_the_final_failure_fails(db, storage):
    sid = add_submission(db, storage, b"x", status="extracted", text="T")
    enqueue_feedback(db, sid, max_attempts=2)
    job = _lease(db, "feedback")
    assert q.retry(db, job.id, job.lease_key, code="unexpected_error", message="x",
                   delay=0) == "queued"
    assert status_of(db, sid) == ("extracted", "feedback_retrying")
    job = _lease(db, "feedback")
    assert q.retry(db, job.id, job.lease_key, code="feedback_retrying", message="x",
                   delay=0) == "failed"
    assert status_of(db, sid) == ("failed", "feedback_failed")


def test_a_lost_lease_changes_neither_job_nor_submission(db, storage):
    sid = add_submission(db, storage, b"x")
    enqueue_vision(db, storage, sid, make_pdf("x"))
    job = _lease(db, "vision")
    assert q.fail(db, job.id, uuid.uuid4(), code="vision_failed", message="x") is False
    assert status_of(db, sid) == ("pending", None)


def test_pdf_retries_are_not_mirrored_but_its_final_failure_is(db, storage):
    sid = add_submission(db, storage, b"x")
    enqueue_pdf(db, sid)
    job = _lease(db, "pdf")
    q.retry(db, job.id, job.lease_key, code="unexpected_error", message="x", delay=0)
    assert status_of(db, sid) == ("pending", None)
    job = _lease(db, "pdf")
    q.fail(db, job.id, job.lease_key, code="image_invalid", message="x")
    assert status_of(db, sid) == ("failed", "image_invalid")


def test_cancelling_a_stage_fails_the_submission(db, storage):
    sid = add_submission(db, storage, b"x")
    job_id = enqueue_vision(db, storage, sid, make_pdf("x"))
    assert q.cancel(db, job_id) == "cancelled"
    assert status_of(db, sid) == ("failed", "vision_cancelled")


def test_rescue_of_a_dead_workers_jobs_survives_a_malformed_payload(db, storage):
    sid = add_submission(db, storage, b"x")
    enqueue_vision(db, storage, sid, make_pdf("x"), max_attempts=1)
    q.enqueue(db, q.NewJob("vision", {"submission_id": "not-a-uuid", "owner_sub": "x"},
                           max_attempts=1))
    # Each held alone by its dead worker: charged, and out of attempts.
    q.lease(db, "vision", 1, worker_id="dead-1", lease_seconds=30)
    q.lease(db, "vision", 1, worker_id="dead-2", lease_seconds=30)
    rescued = q.rescue(db, leased_by="dead-1") + q.rescue(db, leased_by="dead-2")
    assert sorted(status for _, _, status in rescued) == ["failed", "failed"]
    assert status_of(db, sid) == ("failed", "vision_failed")


def test_a_job_for_another_owner_cannot_touch_the_submission(db, storage):
    sid = add_submission(db, storage, b"x", owner="alice")
    q.enqueue(db, q.NewJob("vision", {"submission_id": sid, "owner_sub": "mallory"}))
    job = _lease(db, "vision")
    q.fail(db, job.id, job.lease_key, code="vision_failed", message="x")
    assert status_of(db, sid) == ("pending", None)


# --- standalone pdf jobs --------------------------------------------------------------------


def test_standalone_pdf_job_returns_page_text_and_hands_back_caller_fields(
        db, env, storage, workers):
    storage.write("inbox/doc.pdf", make_pdf("Seite eins", "Seite zwei"))
    by_key = q.enqueue(db, q.NewJob("pdf", {
        "file": "inbox/doc.pdf", "extraction_method": "text", "include_images": True,
        "template": "summary-v1", "context": {"course": 7}}))
    by_path = q.enqueue(db, q.NewJob("pdf", {"file_path": str(storage.root / "inbox/doc.pdf")}))
    outside = q.enqueue(db, q.NewJob("pdf", {"file": "/etc/passwd"}))
    workers.start(env, "pdf", *FAST)
    wait_for(lambda: counts(db, "pdf").get("queued", 0) + counts(db, "pdf").get("leased", 0)
             == 0, what="pdf jobs finished")
    result = q.get_job(db, by_key)["result"]
    assert [p["text"].strip() for p in result["pages"]] == ["Seite eins", "Seite zwei"]
    assert len(result["image_keys"]) == 2 and all(storage.exists(k) for k in result["image_keys"])
    assert (result["template"], result["context"]) == ("summary-v1", {"course": 7})
    assert result["extraction_method"] == "text" and result["include_images"] is True
    assert q.get_job(db, by_path)["result"]["page_count"] == 2
    row = q.get_job(db, outside)
    assert (row["status"], row["error_code"]) == ("failed", "invalid_payload")


# --- the CLI -------------------------------------------------------------------------------

def jobvisor(env: dict[str, str], *args: str, timeout: float = 180
             ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "supervisor_app", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_submit_wait_takes_a_real_pdf_to_completed_with_the_stub_backend(
        db, env, tmp_path, workers):
    pdf = tmp_path / "aufsatz.pdf"
    pdf.write_bytes(make_pdf("Die Struktur meines Aufsatzes ist klar.", "Argumentation folgt."))
    criteria = tmp_path / "criteria.json"
    criteria.write_text(json.dumps(CRITERIA))
    for job_type in ("pdf", "vision", "feedback"):
        workers.start(env, job_type, *FAST)
    proc = jobvisor(env, "submit", str(pdf), "--owner", "alice", "--criteria", str(criteria),
                    "--wait", "--timeout", "120s")
    assert proc.returncode == 0, proc.stderr
    sid, _, feedback = proc.stdout.partition("\n")
    row = submission(db, sid.strip())
    assert row["analysis_status"] == "completed" and row["owner_sub"] == "alice"
    assert row["criteria"] == CRITERIA and row["mime_type"] == "application/pdf"
    assert feedback.strip() == row["feedback_md"].strip()
    stages = [line.rsplit(": ", 1)[1] for line in proc.stderr.splitlines()
              if line.startswith(f"submission {row['id']}: ")]
    assert stages == ["pending", "extracted", "completed"]
    # The text is the PDF's own; the feedback is the stub's, and stderr says so.
    [note] = [line for line in proc.stderr.splitlines() if line.startswith("note: ")]
    assert "the feedback is a placeholder" in note and "AI_BACKEND=stub" in note
    assert "text is a placeholder" not in note

    shown = jobvisor(env, "submissions", "show", str(row["id"]), "--json")
    assert shown.returncode == 0, shown.stderr
    shown = json.loads(shown.stdout)
    assert shown["analysis_status"] == "completed"
    assert (shown["text_backend"], shown["feedback_backend"]) == ("text_layer", "stub")


def test_cli_submit_wait_of_a_photo_with_the_stub_says_text_and_feedback_are_placeholders(
        db, env, tmp_path, workers):
    pix = pymupdf.Pixmap(pymupdf.csRGB, pymupdf.IRect(0, 0, 64, 48), False)
    pix.clear_with(200)
    photo = tmp_path / "foto.png"
    photo.write_bytes(pix.tobytes("png"))
    env = env | {"AI_FEEDBACK_LANGUAGE": "en"}  # English, by the setting alone
    for job_type in ("pdf", "vision", "feedback"):
        workers.start(env, job_type, *FAST)
    proc = jobvisor(env, "submit", str(photo), "--owner", "alice", "--wait",
                    "--timeout", "120s")
    assert proc.returncode == 0, proc.stderr
    sid, _, feedback = proc.stdout.partition("\n")
    row = submission(db, sid.strip())
    assert (row["text_backend"], row["feedback_backend"]) == ("stub", "stub")
    assert row["text_body"].startswith("[Placeholder")
    assert feedback.startswith("> **Placeholder") and "## Feedback" in feedback
    [note] = [line for line in proc.stderr.splitlines() if line.startswith("note: ")]
    assert "the text and the feedback are placeholders" in note

    shown = jobvisor(env, "submissions", "show", sid.strip(), "--owner", "alice")
    assert shown.returncode == 0, shown.stderr
    lines = [line.strip() for line in shown.stdout.splitlines()]
    assert "text_backend: stub (placeholder)" in lines
    assert "feedback_backend: stub (placeholder)" in lines
    shown = json.loads(jobvisor(env, "submissions", "show", sid.strip(), "--owner", "alice",
                                "--json").stdout)
    assert (shown["text_backend"], shown["feedback_backend"]) == ("stub", "stub")


def test_cli_submit_wait_exits_1_naming_the_error_code_when_the_submission_fails(
        db, env, tmp_path, workers):
    bad = tmp_path / "kaputt.pdf"
    bad.write_bytes(b"%PDF-1.7\n" + b"\x00garbage" * 50)
    workers.start(env, "pdf", *FAST)
    proc = jobvisor(env, "submit", str(bad), "--wait", "--timeout", "120s")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].endswith("failed: pdf_invalid")


def test_cli_submit_refuses_what_is_not_a_pdf_or_photo_and_times_out_with_1(env, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("just text")
    proc = jobvisor(env, "submit", str(text))
    assert proc.returncode == 2 and "not a PDF, PNG or JPEG" in proc.stderr
    pdf = tmp_path / "a.pdf"
    pdf.write_bytes(make_pdf("x"))
    proc = jobvisor(env, "submit", str(pdf), "--wait", "--timeout", "1s")  # no workers
    assert proc.returncode == 1 and "still pending after 1s" in proc.stderr


# --- settings from the YAML and progress -------------------------------------------------


def test_yaml_model_options_and_keep_alive_reach_ollama(db, env, storage, fake, workers):
    sid = add_submission(db, storage, make_pdf("Der Hund bellt."))
    enqueue_vision(db, storage, sid, make_pdf("Der Hund bellt."))
    env = _ollama(env, feedback="stub") | {"AI_VISION_OPTIONS": '{"temperature": 0, "seed": 7}'}
    workers.start(env, "vision", *FAST, "--options",
                  '{"model_options": {"num_ctx": 8192, "seed": 3}, "keep_alive": "10m"}')
    workers.start(env, "feedback", *FAST)
    wait_for(lambda: _finished(db, sid), what="submission finished")
    (request,) = [r for r in fake.requests("/api/chat") if r.get("model") == VISION]
    body = request.get("body", request)
    assert body["options"] == {"temperature": 0, "seed": 3, "num_ctx": 8192}
    assert body["keep_alive"] == "10m"


@pytest.mark.skipif(not tesseract_available(), reason="Debian's tesseract-ocr is not installed")
def test_tesseract_vision_reports_progress_per_page(storage):
    from workers.learning.ai.vision import VisionSettings
    from workers.learning.handlers import vision

    doc = pymupdf.open()
    for i in (1, 2, 3):
        doc.insert_pdf(pymupdf.open(stream=make_pdf(f"Seite {i}: Übung macht den Meister."),
                                    filetype="pdf"))
    render = render_pdf(doc.tobytes(), storage)
    images = [storage.read(k) for k in render.page_keys]

    class Ctx:  # records what the handler reports; the runtime stores it (rate-limited)
        notes: list[tuple[float, str]] = []

        def progress(self, fraction: float, note: str) -> None:
            self.notes.append((fraction, note))

        def check_cancelled(self) -> None:
            pass

    ctx = Ctx()
    read = vision._read(images, "tesseract", None, VisionSettings(), ctx)
    text, backend = read.text, read.backend_used
    assert backend == "tesseract"
    assert [n for _, n in ctx.notes] == ["page 1/3", "page 2/3", "page 3/3"]
    assert [f for f, _ in ctx.notes] == sorted(f for f, _ in ctx.notes)
    assert all(f"Seite {i}" in text for i in (1, 2, 3))
