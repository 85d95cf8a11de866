"""The stub AI backend says what it is (issue #14, "Honest defaults"): its OCR text and its
feedback are marked as placeholders at the top, its sentences are grammatical (1 Wort /
2 Wörter, 1 word / 2 words), and the feedback language is a setting
(`AI_FEEDBACK_LANGUAGE=de|en`, default de; anything else is a config error).

No database, no model: the adapters are called directly."""

from __future__ import annotations

import re

import pytest

from workers.learning.ai.feedback import FeedbackSettings, feedback_language, write_feedback
from workers.learning.ai.vision import VisionSettings, extract_text, read_pages

# Distinctive, so a leak into the stub's own words is unmistakable.
STUDENT = "Mein Hamster Bartholomäus frisst heimlich Kirschkerne im Mondschein."


def _stub(text: str, criteria: list[str], language: str = "de") -> str:
    settings = FeedbackSettings(base_url="http://127.0.0.1:9", model="", language=language)
    return write_feedback(text, criteria, backend="stub", settings=settings).feedback_md


# --- OCR placeholder ---------------------------------------------------------------


def test_stub_ocr_without_a_text_layer_is_a_marked_placeholder() -> None:
    result = read_pages([b"page one"], engine="stub", text_layer=None, settings=VisionSettings())
    assert result.backend_used == "stub"
    # First thing in the text, in words, not only a tag: it ends up in `text_body`.
    assert re.match(r"^\[placeholder\b", result.text, re.IGNORECASE), result.text
    assert "AI_BACKEND" in result.text
    assert "stub-ocr" not in result.text


@pytest.mark.parametrize(("pages", "says", "never"), [
    (1, "1 page,", "1 pages"),
    (3, "3 pages,", "page(s)"),
])
def test_stub_ocr_placeholder_counts_pages_grammatically(pages: int, says: str,
                                                         never: str) -> None:
    images = [bytes([i]) * 8 for i in range(pages)]
    text = extract_text(images, engine="stub", text_layer=None, settings=VisionSettings())
    assert says in text and never not in text and "page(s)" not in text


def test_stub_ocr_uses_the_pdfs_text_layer_and_says_it_did() -> None:
    # A PDF's own text is real text: no placeholder, and the backend says where it came from.
    result = read_pages([b"png"], engine="stub", text_layer=STUDENT, settings=VisionSettings())
    assert (result.text, result.backend_used) == (STUDENT, "text_layer")
    blank = read_pages([b"png"], engine="stub", text_layer="  \n", settings=VisionSettings())
    assert blank.backend_used == "stub" and blank.text.lower().startswith("[placeholder")


# --- feedback placeholder ------------------------------------------------------------


@pytest.mark.parametrize(("language", "banner"), [("de", "Platzhalter"), ("en", "Placeholder")])
def test_stub_feedback_says_it_is_a_placeholder_in_its_first_line(language: str,
                                                                 banner: str) -> None:
    md = _stub(STUDENT, ["Inhalt"], language)
    first = md.splitlines()[0]
    assert banner in first and "AI_BACKEND" in md
    assert "Bartholomäus" not in md  # counts, not quotes


@pytest.mark.parametrize(("text", "says", "never"), [
    ("Hallo.", "1 Wort in 1 Satz.", ("1 Wörter", "1 Sätzen")),
    ("Eins zwei drei. Vier fünf sechs.", "6 Wörter in 2 Sätzen.", ("6 Wort ", "2 Satz.")),
    ("Nur ein Satz mit fünf Wörtern", "6 Wörter in 1 Satz.", ("1 Sätzen",)),
])
def test_stub_feedback_counts_words_and_sentences_grammatically_in_german(
        text: str, says: str, never: tuple[str, ...]) -> None:
    md = _stub(text, [])
    assert says in md, md
    assert not [n for n in never if n in md], md


@pytest.mark.parametrize(("text", "says"), [
    ("Hello.", "1 word in 1 sentence."),
    ("One two three. Four five six.", "6 words in 2 sentences."),
    ("Just one sentence", "3 words in 1 sentence."),
])
def test_stub_feedback_counts_words_and_sentences_grammatically_in_english(
        text: str, says: str) -> None:
    md = _stub(text, [], "en")
    assert says in md, md
    assert "1 words" not in md and "1 sentences" not in md


def test_stub_feedback_criterion_comments_agree_in_number() -> None:
    de = _stub("Hallo Welt, schöne Welt.", ["Hallo", "Struktur und Gliederung", "Stil", "Ton",
                                            "Hallo schöne Welt", "Welt und Gliederung"])
    assert "1 von 1 Schlüsselbegriff des Kriteriums kommt im Text vor." in de
    assert "Keiner der 2 Schlüsselbegriffe des Kriteriums kommt im Text vor." in de
    assert "Der Schlüsselbegriff des Kriteriums kommt im Text nicht vor." in de  # "Stil"
    assert "Das Kriterium nennt keinen Schlüsselbegriff" in de  # "Ton": no word > 3 letters
    assert "3 von 3 Schlüsselbegriffen des Kriteriums kommen im Text vor." in de
    assert "1 von 2 Schlüsselbegriffen des Kriteriums kommt im Text vor." in de
    en = _stub("Hello world, nice world.", ["Hello", "Structure and outline", "Style", "Art",
                                            "Hello nice world", "World and outline"], "en")
    assert "1 of 1 key term of the criterion appears in the text." in en
    assert "None of the criterion's 2 key terms appears in the text." in en
    assert "The criterion's key term does not appear in the text." in en  # "Style"
    assert "The criterion names no key term" in en  # "Art"
    assert "3 of 3 key terms of the criterion appear in the text." in en
    assert "1 of 2 key terms of the criterion appears in the text." in en
    assert " 0 of " not in en and " 0 von " not in de


def test_stub_feedback_in_english_is_english_throughout() -> None:
    md = _stub("Structure matters. So does argument.", ["Structure", "Argument"], "en")
    assert "## Feedback" in md and "Your text has 5 words in 2 sentences." in md
    for german in ("Rückmeldung", "Dein Text", "Wörter", "Schlüsselbegriff", "Platzhalter"):
        assert german not in md, german


# --- the setting -----------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [
    (None, "de"), ("", "de"), ("de", "de"), ("en", "en"), (" EN ", "en"),
])
def test_feedback_language_comes_from_the_environment(
        monkeypatch: pytest.MonkeyPatch, value: str | None, expected: str) -> None:
    monkeypatch.delenv("AI_FEEDBACK_LANGUAGE", raising=False)
    if value is not None:
        monkeypatch.setenv("AI_FEEDBACK_LANGUAGE", value)
    assert feedback_language() == expected
    assert FeedbackSettings.from_env().language == expected


def test_english_via_the_setting_reaches_the_stub(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AI_FEEDBACK_LANGUAGE", "en")
    result = write_feedback("Hello.", ["Greeting"], backend="stub",
                            settings=FeedbackSettings.from_env())
    assert result.feedback_md.splitlines()[0].startswith("> **Placeholder")
    assert "1 word in 1 sentence." in result.feedback_md


@pytest.mark.parametrize("value", ["fr", "deutsch", "de_DE"])
def test_an_unknown_feedback_language_is_a_config_error_naming_the_variable(
        monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("AI_FEEDBACK_LANGUAGE", value)
    with pytest.raises(ValueError, match="AI_FEEDBACK_LANGUAGE must be one of de, en"):
        feedback_language()
    with pytest.raises(ValueError, match="AI_FEEDBACK_LANGUAGE"):
        FeedbackSettings.from_env()
    with pytest.raises(ValueError, match="AI_FEEDBACK_LANGUAGE"):
        FeedbackSettings(language=value)


# --- what the CLI says about it ----------------------------------------------------------


@pytest.mark.parametrize(("text", "feedback", "says"), [
    ("stub", "stub", "the text and the feedback are placeholders"),
    ("text_layer", "stub", "the feedback is a placeholder"),
    ("stub", "ollama", "the text is a placeholder"),
    ("ollama", "dspy", None),
    ("tesseract", "ollama", None),
    (None, None, None),  # unknown (written before migration 004): no claim either way
])
def test_the_cli_notes_a_placeholder_only_when_the_stub_made_one(
        text: str | None, feedback: str | None, says: str | None) -> None:
    from workers.learning.cli import placeholder_note

    note = placeholder_note({"text_backend": text, "feedback_backend": feedback})
    if says is None:
        assert note is None
    else:
        assert note is not None and note.startswith(f"note: {says} from the stub backend")
        assert "AI_BACKEND=local" in note
