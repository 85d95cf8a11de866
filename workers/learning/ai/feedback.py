"""Text + criteria → feedback markdown and a `criteria.v2` analysis, for the feedback handler.

Backends:
- `stub`: no model; deterministic scores from word counts and the overlap of each
  criterion's words with the text. Its markdown opens with a line saying it is a
  placeholder (`> **Platzhalter …**` / `> **Placeholder …**`).
- `dspy`: a typed DSPy signature on Ollama's OpenAI-compatible endpoint (`/v1`).
  When DSPy fails to parse the answer or to set itself up, a WARN is logged (error
  class and code only) and the `ollama` path runs instead. When the server itself
  fails (503/429 busy, a timeout, another 5xx, no connection) the job is retried by
  the queue with backoff instead: a second request to a busy server helps no one.
- `ollama`: one direct `/api/chat` call with a JSON schema in `format`.

`analysis` follows `criteria.v2`::

    {"schema": "criteria.v2", "max_score": 10,
     "criteria": [{"criterion": str, "score": 0..10, "max_score": 10, "comment": str}]}

with exactly one entry per requested criterion, in the requested order, named as
requested (the platform's wording is canonical, not the model's).

Environment (read by `FeedbackSettings.from_env` and `feedback_backend`):
- `AI_FEEDBACK_BACKEND`: stub | dspy | ollama; unset → derived from `AI_BACKEND`
  (stub → stub, local → dspy); default stub.
- `OLLAMA_BASE_URL` (default http://localhost:11434), `AI_FEEDBACK_MODEL` (no
  default; required by dspy and ollama).
- `AI_CONNECT_TIMEOUT` (5 s), `AI_FEEDBACK_READ_TIMEOUT` else `AI_READ_TIMEOUT` (120 s).
- `AI_KEEP_ALIVE` (direct path only: `/v1` has no keep_alive), `AI_FEEDBACK_OPTIONS`
  (JSON object of Ollama options; `temperature`, `top_p`, `seed`, `num_predict`,
  `stop` also reach DSPy).
- `AI_FEEDBACK_LANGUAGE`: de | en (default de), the language the feedback is written in:
  the stub's text, and the instructions, field descriptions and prompt the dspy and
  ollama backends send. Anything else is a configuration error naming the variable.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Literal

import pydantic

from workers.core import model_gate
from workers.core.errors import PermanentError, TransientError
from workers.learning.ai import ai_backend, ollama

log = logging.getLogger("jobvisor.ai")

Backend = Literal["stub", "dspy", "ollama"]
BACKENDS: tuple[str, ...] = ("stub", "dspy", "ollama")
SCHEMA = "criteria.v2"
MAX_SCORE = 10
RETRY_CODE = "feedback_retrying"
FAIL_CODE = "feedback_failed"
MAX_COMMENT = 2000

Language = Literal["de", "en"]
LANGUAGES: tuple[str, ...] = ("de", "en")
DEFAULT_LANGUAGE: Language = "de"


@dataclass(frozen=True)
class _Wording:
    """Everything the feedback says or asks in one language."""

    instructions: str  # the system prompt (direct) and the signature's instructions (DSPy)
    text_desc: str  # DSPy field descriptions
    criteria_desc: str
    feedback_desc: str
    analysis_desc: str
    criteria_label: str  # the direct call's user message
    text_label: str
    answer_as: str
    # the stub's markdown
    banner: str
    heading: str
    counts: str  # {words} {sentences}
    word: tuple[str, str]  # singular, plural
    sentence: tuple[str, str]
    hits: str  # {hits} {terms} {verb}: some of the criterion's key terms occur
    term: tuple[str, str]
    verb: tuple[str, str]  # agreeing with `hits`: 1, else
    none_of_one: str  # the criterion's one key term does not occur
    none_of_many: str  # {terms}: none of them occurs
    no_terms: str


WORDING: dict[str, _Wording] = {
    "de": _Wording(
        instructions=(
            "Du bist eine erfahrene Lehrkraft. Gib der Schülerin oder dem Schüler eine "
            "konstruktive, ermutigende Rückmeldung auf Deutsch zu ihrem Text. Bewerte jedes "
            f"Kriterium einzeln mit einer ganzen Zahl von 0 (nicht erfüllt) bis {MAX_SCORE} "
            "(voll erfüllt) und begründe kurz. Zitiere keine langen Passagen aus dem Text."
        ),
        text_desc="Text der Schülerin / des Schülers",
        criteria_desc="Bewertungskriterien",
        feedback_desc="Rückmeldung an die Lernenden, Markdown, Deutsch",
        analysis_desc="genau ein Eintrag je Kriterium, in derselben Reihenfolge",
        criteria_label="Kriterien (JSON)",
        text_label="Text",
        answer_as=("Antworte als JSON mit `feedback_md` (Markdown) und `criteria` "
                   "(je Kriterium `criterion`, `score`, `comment`, in derselben Reihenfolge)."),
        banner=("> **Platzhalter – keine echte Rückmeldung.** Kein KI-Modell hat diesen Text "
                "gelesen (`AI_BACKEND=stub`): Die Punkte zählen nur Wörter und "
                "Schlüsselbegriffe."),
        heading="## Rückmeldung",
        counts="Dein Text umfasst {words} in {sentences}.",
        word=("Wort", "Wörter"),
        sentence=("Satz", "Sätzen"),
        hits="{hits} von {terms} des Kriteriums {verb} im Text vor.",
        term=("Schlüsselbegriff", "Schlüsselbegriffen"),
        verb=("kommt", "kommen"),
        none_of_one="Der Schlüsselbegriff des Kriteriums kommt im Text nicht vor.",
        none_of_many="Keiner der {terms} Schlüsselbegriffe des Kriteriums kommt im Text vor.",
        no_terms="Das Kriterium nennt keinen Schlüsselbegriff (ein Wort mit mehr als drei "
                 "Buchstaben).",
    ),
    "en": _Wording(
        instructions=(
            "You are an experienced teacher. Give the student constructive, encouraging "
            "feedback in English on their text. Score each criterion separately with a whole "
            f"number from 0 (not met) to {MAX_SCORE} (fully met) and give a short reason. "
            "Do not quote long passages from the text."
        ),
        text_desc="the student's text",
        criteria_desc="assessment criteria",
        feedback_desc="feedback to the student, Markdown, English",
        analysis_desc="exactly one entry per criterion, in the same order",
        criteria_label="Criteria (JSON)",
        text_label="Text",
        answer_as=("Answer as JSON with `feedback_md` (Markdown) and `criteria` (for each "
                   "criterion `criterion`, `score`, `comment`, in the same order)."),
        banner=("> **Placeholder – not real feedback.** No AI model read this text "
                "(`AI_BACKEND=stub`): the scores only count words and key terms."),
        heading="## Feedback",
        counts="Your text has {words} in {sentences}.",
        word=("word", "words"),
        sentence=("sentence", "sentences"),
        hits="{hits} of {terms} of the criterion {verb} in the text.",
        term=("key term", "key terms"),
        verb=("appears", "appear"),
        none_of_one="The criterion's key term does not appear in the text.",
        none_of_many="None of the criterion's {terms} key terms appears in the text.",
        no_terms="The criterion names no key term (a word of more than three letters).",
    ),
}
# The German instructions, as before the language setting (kept for importers).
INSTRUCTIONS = WORDING["de"].instructions


def feedback_language(value: str | None = None) -> Language:
    """AI_FEEDBACK_LANGUAGE (or `value`): de | en, default de; anything else is a ValueError
    naming the variable."""
    raw = os.environ.get("AI_FEEDBACK_LANGUAGE") if value is None else value
    language = (raw or DEFAULT_LANGUAGE).strip().lower() or DEFAULT_LANGUAGE
    if language not in LANGUAGES:
        raise ValueError(f"AI_FEEDBACK_LANGUAGE must be one of {', '.join(LANGUAGES)}, "
                         f"got {raw!r}")
    return language  # type: ignore[return-value]


class CriterionAssessment(pydantic.BaseModel):
    """One criterion as a model answers it (lenient: scores are clamped afterwards)."""

    criterion: str
    # The range is advertised in the schema (models read it) but not enforced:
    # an 11 or a 7.5 is clamped and rounded rather than failing the whole answer.
    score: float = pydantic.Field(
        allow_inf_nan=False,
        # Both languages: one schema serves every AI_FEEDBACK_LANGUAGE.
        description=f"0–{MAX_SCORE}: 0 = nicht erfüllt / not met, "
                    f"{MAX_SCORE} = voll erfüllt / fully met",
        json_schema_extra={"minimum": 0, "maximum": MAX_SCORE},
    )
    comment: str = ""


class _DirectAnswer(pydantic.BaseModel):
    feedback_md: str
    criteria: list[CriterionAssessment]


# Inline (no $ref): Ollama turns `format` into a grammar; keep the schema plain.
DIRECT_FORMAT: dict[str, Any] = {
    "type": "object",
    "properties": {
        "feedback_md": {"type": "string"},
        "criteria": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "criterion": {"type": "string"},
                    "score": {"type": "integer", "minimum": 0, "maximum": MAX_SCORE},
                    "comment": {"type": "string"},
                },
                "required": ["criterion", "score", "comment"],
            },
        },
    },
    "required": ["feedback_md", "criteria"],
}


@dataclass(frozen=True)
class FeedbackSettings:
    base_url: str = ollama.DEFAULT_BASE_URL
    model: str = ""
    timeout: ollama.Timeout = (ollama.DEFAULT_CONNECT_TIMEOUT, ollama.DEFAULT_READ_TIMEOUT)
    keep_alive: str | float | None = None
    options: dict[str, Any] = field(default_factory=dict)
    language: str = DEFAULT_LANGUAGE

    def __post_init__(self) -> None:
        # Normalised and checked here too: settings built in code fail like the env does.
        object.__setattr__(self, "language", feedback_language(self.language))

    @classmethod
    def from_env(cls, **overrides: Any) -> FeedbackSettings:
        """Settings from the environment; keyword arguments win."""
        values: dict[str, Any] = {
            "base_url": ollama.base_url_from_env(),
            "model": os.environ.get("AI_FEEDBACK_MODEL", "").strip(),
            "timeout": ollama.timeout_from_env("feedback"),
            "keep_alive": ollama.keep_alive_from_env(),
            "options": ollama.options_from_env("AI_FEEDBACK_OPTIONS"),
            "language": feedback_language(),
        }
        values.update(overrides)
        return cls(**values)


@dataclass(frozen=True)
class FeedbackResult:
    feedback_md: str
    analysis: dict[str, Any]
    backend_used: str  # "stub" | "dspy" | "ollama" (ollama also after a DSPy fallback)


def feedback_backend() -> Backend:
    """AI_FEEDBACK_BACKEND, else AI_BACKEND (stub → stub, local → dspy); default stub."""
    explicit = (os.environ.get("AI_FEEDBACK_BACKEND") or "").strip().lower()
    if explicit:
        if explicit not in BACKENDS:
            raise ValueError(f"AI_FEEDBACK_BACKEND must be one of {', '.join(BACKENDS)}, got {explicit!r}")
        return explicit  # type: ignore[return-value]
    return "dspy" if ai_backend() == "local" else "stub"


def write_feedback(
    text: str,
    criteria: list[str],
    *,
    backend: Backend,
    settings: FeedbackSettings,
) -> FeedbackResult:
    """Feedback on `text` against `criteria`.

    Raises `TransientError("feedback_retrying", ...)` / `PermanentError("feedback_failed", ...)`.
    """
    if backend == "stub":
        return _stub(text, criteria, WORDING[settings.language])
    if backend not in ("dspy", "ollama"):
        raise PermanentError(FAIL_CODE, f"unknown feedback backend {backend!r}")
    if not settings.model:
        raise PermanentError(FAIL_CODE, "AI_FEEDBACK_MODEL is not set")
    if backend == "dspy":
        try:
            return _dspy(text, criteria, settings)
        except TransientError:
            raise  # the server is busy, down or slow: the direct path would hit it again
        except Exception as exc:  # noqa: BLE001 - parsing or configuration: use the direct path
            # Class and code only: DSPy's messages can quote the model's answer.
            log.warning("feedback_dspy_failed", extra={
                "error_class": type(exc).__name__,
                "error_code": str(getattr(exc, "code", "") or ""),
            })
    return _direct(text, criteria, settings)


# --- stub -------------------------------------------------------------------------


def _stub(text: str, criteria: list[str], say: _Wording) -> FeedbackResult:
    words = re.findall(r"\w+", text.lower())
    vocab = set(words)
    sentences = len([s for s in re.split(r"[.!?]+", text) if s.strip()])
    length_points = min(4, len(words) // 50)
    items = []
    for criterion in criteria:
        terms = sorted({w for w in re.findall(r"\w+", criterion.lower()) if len(w) > 3})
        hits = sum(1 for t in terms if t in vocab)
        score = 0 if not words else min(MAX_SCORE, 2 + length_points + 4 * hits // max(1, len(terms)))
        comment = _hits(say, hits, len(terms))
        items.append(CriterionAssessment(criterion=criterion, score=score, comment=comment))
    lines = [
        # First, so that nobody takes it for a model's judgement (issue #14).
        say.banner,
        "",
        say.heading,
        "",
        say.counts.format(words=_count(len(words), say.word),
                          sentences=_count(sentences, say.sentence)),
        "",
        *[f"- **{i.criterion}**: {int(i.score)}/{MAX_SCORE} – {i.comment}" for i in items],
    ]
    return FeedbackResult("\n".join(lines), _analysis(criteria, items), "stub")


def _hits(say: _Wording, hits: int, terms: int) -> str:
    """How many of a criterion's key terms the text uses, in a grammatical sentence."""
    if not terms:
        return say.no_terms
    if not hits:
        return say.none_of_one if terms == 1 else say.none_of_many.format(terms=terms)
    return say.hits.format(hits=hits, terms=_count(terms, say.term),
                           verb=say.verb[0 if hits == 1 else 1])


def _count(n: int, forms: tuple[str, str]) -> str:
    """`1 Wort`, `0 Wörter`, `2 Wörter`: the singular for exactly one (both languages)."""
    return f"{n} {forms[0] if n == 1 else forms[1]}"


# --- dspy -------------------------------------------------------------------------

_lm_lock = threading.Lock()
_lms: dict[tuple[Any, ...], Any] = {}
_signatures: dict[str, Any] = {}  # one per language


def _dspy(text: str, criteria: list[str], settings: FeedbackSettings) -> FeedbackResult:
    # Must precede the first `import dspy`: otherwise LiteLLM fetches its model
    # cost map from the network at import. Forced, not defaulted: no cloud egress.
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    import dspy

    # A per-call context, not dspy.configure: jobs run in threads, and the
    # context is thread-local. No history: it would keep student text in memory.
    # No JSONAdapter retry on a parse failure: our fallback is a schema-constrained
    # Ollama call, which is likelier to parse, for the same one extra inference.
    adapter = dspy.ChatAdapter(use_json_adapter_fallback=False)
    try:
        with model_gate.gate().call(settings.base_url, settings.model,
                                    wait=settings.timeout[1]) as call:
            try:
                with dspy.context(lm=_lm(settings), adapter=adapter, disable_history=True):
                    prediction = dspy.Predict(_feedback_signature(settings.language))(
                        text=text, criteria=list(criteria))
            except Exception as exc:
                kind = _server_failure(exc)
                if kind is None:
                    raise
                if kind == "busy":
                    call.busy()
                elif kind == "timeout":
                    call.timeout()
                else:
                    call.down()
                status = getattr(exc, "status", None)
                raise TransientError(RETRY_CODE, f"dspy: model server {kind}"
                                     f"{f' ({status})' if status else ''}, "
                                     f"model={settings.model}") from None
            call.ok()  # /v1 reports no durations: the round trip against its baseline
    except model_gate.NoToken as exc:
        raise TransientError(RETRY_CODE, f"{exc} (the endpoint's limit is in use)") from None
    items = [
        i if isinstance(i, CriterionAssessment) else CriterionAssessment.model_validate(i)
        for i in prediction.analysis
    ]
    return FeedbackResult(str(prediction.feedback_md).strip(), _analysis(criteria, items), "dspy")


def _server_failure(exc: BaseException) -> str | None:
    """What a DSPy error says of the model server: "busy" (503/429), "timeout", "down"
    (another 5xx, a refused or dropped connection); None for anything else (parsing,
    configuration, a rejected request), which the direct path may well get past."""
    from dspy.utils import exceptions as lm_errors

    if isinstance(exc, lm_errors.LMRateLimitError):
        return "busy"
    if isinstance(exc, lm_errors.LMServerError):
        return "busy" if getattr(exc, "status", None) in ollama.BUSY_STATUSES else "down"
    if isinstance(exc, lm_errors.LMTimeoutError):
        return "timeout"
    if isinstance(exc, lm_errors.LMTransportError):
        cause: BaseException | None = exc
        while cause is not None:  # lm15 wraps a read timeout as a transport error
            if isinstance(cause, TimeoutError) or "Timeout" in type(cause).__name__:
                return "timeout"
            cause = cause.__cause__ or cause.__context__
        return "down"
    return None


def _lm(settings: FeedbackSettings) -> Any:
    """One dspy.LM per configuration and process (it owns a connection pool)."""
    import dspy
    import httpx

    connect, read = settings.timeout
    generation = _dspy_generation_options(settings.options)
    key = (settings.model, settings.base_url, connect, read, json.dumps(generation, sort_keys=True))
    with _lm_lock:
        lm = _lms.get(key)
        if lm is None:
            # "ollama/" is lm15's keyless local-server route: no API key is needed
            # or sent from the environment (an "openai/" route would demand or
            # forward OPENAI_API_KEY). engine="lm15" pins the native engine:
            # "auto" hands "ollama/..." to LiteLLM whenever OLLAMA_BASE_URL is set,
            # which then calls /v1/api/generate. num_retries=0: the queue owns retries.
            lm = dspy.LM(
                f"ollama/{settings.model}",
                engine="lm15",
                api_base=settings.base_url.rstrip("/") + "/v1",
                timeout=httpx.Timeout(connect=connect, read=read, write=read, pool=connect),
                num_retries=0,
                cache=False,
                **generation,
            )
            _lms[key] = lm
        return lm


def _dspy_generation_options(options: dict[str, Any]) -> dict[str, Any]:
    """The Ollama options `/v1/chat/completions` can express, in OpenAI names."""
    names = {"temperature": "temperature", "top_p": "top_p", "seed": "seed",
             "num_predict": "max_tokens", "stop": "stop"}
    return {names[k]: v for k, v in options.items() if k in names}


def _feedback_signature(language: str) -> Any:
    signature = _signatures.get(language)
    if signature is None:
        import dspy

        say = WORDING[language]

        class WriteFeedback(dspy.Signature):
            text: str = dspy.InputField(desc=say.text_desc)
            criteria: list[str] = dspy.InputField(desc=say.criteria_desc)
            feedback_md: str = dspy.OutputField(desc=say.feedback_desc)
            analysis: list[CriterionAssessment] = dspy.OutputField(desc=say.analysis_desc)

        # Two threads may both build it: equal classes, the last one stays. Harmless.
        signature = _signatures[language] = WriteFeedback.with_instructions(say.instructions)
    return signature


# --- direct Ollama ----------------------------------------------------------------


def _direct(text: str, criteria: list[str], settings: FeedbackSettings) -> FeedbackResult:
    say = WORDING[settings.language]
    # Criteria first: a JSON list the model (and the fake server) can mirror.
    user = (
        f"{say.criteria_label}:\n{json.dumps(list(criteria), ensure_ascii=False)}\n\n"
        f"{say.text_label}:\n{text}\n\n"
        f"{say.answer_as}"
    )
    messages = [{"role": "system", "content": say.instructions},
                {"role": "user", "content": user}]
    content = ollama.chat(
        settings.base_url, settings.model, messages, options=settings.options or None,
        keep_alive=settings.keep_alive, format=DIRECT_FORMAT, timeout=settings.timeout,
        retry_code=RETRY_CODE, fail_code=FAIL_CODE,
    )
    try:
        answer = _DirectAnswer.model_validate_json(content)
        analysis = _analysis(criteria, answer.criteria)
    except (pydantic.ValidationError, ValueError):
        # A model's output varies between attempts; a retry may well parse.
        raise TransientError(RETRY_CODE, f"ollama answer not valid JSON for {SCHEMA}, "
                                         f"model={settings.model}") from None
    return FeedbackResult(answer.feedback_md.strip(), analysis, "ollama")


# --- shared -----------------------------------------------------------------------


def _analysis(criteria: list[str], items: list[CriterionAssessment]) -> dict[str, Any]:
    """`criteria.v2`: one entry per requested criterion; ValueError if one is missing."""
    wanted = [_key(c) for c in criteria]
    by_name = {_key(i.criterion): i for i in items}
    out = []
    for index, criterion in enumerate(criteria):
        item = by_name.get(wanted[index])
        if item is None and index < len(items) and _key(items[index].criterion) not in wanted:
            item = items[index]  # models paraphrase names; position still tells
        if item is None:
            raise ValueError(f"criterion {index + 1} missing in the model's answer")
        score = max(0, min(MAX_SCORE, round(item.score)))
        out.append({"criterion": criterion, "score": score, "max_score": MAX_SCORE,
                    "comment": item.comment.strip()[:MAX_COMMENT]})
    return {"schema": SCHEMA, "max_score": MAX_SCORE, "criteria": out}


def _key(name: str) -> str:
    return " ".join(re.findall(r"\w+", name.casefold()))
