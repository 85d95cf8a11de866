"""Sizes and durations as written in the YAML."""

from __future__ import annotations

import pytest

from supervisor_app.units import format_bytes, format_duration, parse_bytes, parse_duration


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512MiB", 512 * 1024**2),
        ("2GiB", 2 * 1024**3),
        ("1KiB", 1024),
        ("1TiB", 1024**4),
        ("1Gi", 1024**3),
        ("300MB", 300 * 1000**2),
        ("1.5G", 1_500_000_000),
        ("1kB", 1000),
        ("2TB", 2 * 1000**4),
        ("1024", 1024),
        ("1024B", 1024),
        (" 64 MiB ", 64 * 1024**2),
        ("0", 0),
        (4096, 4096),
        (0, 0),
    ],
)
def test_sizes_parse_binary_decimal_and_bare_bytes(text: str | int, expected: int) -> None:
    assert parse_bytes(text) == expected


def test_size_units_are_case_insensitive() -> None:
    assert parse_bytes("512mib") == parse_bytes("512MiB") == parse_bytes("512MIB")


@pytest.mark.parametrize("bad", ["", "lots", "12 parsecs", "-5MiB", "1.2.3G", "MiB", "5 5MiB"])
def test_bad_size_error_names_the_value(bad: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_bytes(bad)
    assert repr(bad) in str(err.value)


@pytest.mark.parametrize("bad", [True, -1, None, [1]])
def test_size_rejects_bools_negatives_and_other_types(bad: object) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_bytes(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("500ms", 0.5),
        ("30s", 30.0),
        ("10m", 600.0),
        ("2h", 7200.0),
        ("7d", 604800.0),
        ("1h30m", 5400.0),
        ("1m 30s", 90.0),
        ("1.5s", 1.5),
        ("45", 45.0),
        (45, 45.0),
        (0.25, 0.25),
        ("0", 0.0),
    ],
)
def test_durations_parse_units_and_bare_seconds(text: str | float, expected: float) -> None:
    assert parse_duration(text) == pytest.approx(expected)


@pytest.mark.parametrize("bad", ["", "soon", "10 years", "1h30", "-5s", "s", "5x"])
def test_bad_duration_error_names_the_value(bad: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_duration(bad)
    assert repr(bad) in str(err.value)


@pytest.mark.parametrize("bad", [True, -1, float("inf"), float("nan"), None])
def test_duration_rejects_bools_negatives_and_non_finite(bad: object) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0B"),
        (512, "512B"),
        (1024, "1KiB"),
        (1536, "1.5KiB"),
        (512 * 1024**2, "512MiB"),
        (2 * 1024**3, "2GiB"),
        (3 * 1024**4, "3TiB"),
        (-1024, "-1KiB"),
    ],
)
def test_format_bytes_uses_the_largest_binary_unit(n: int, text: str) -> None:
    assert format_bytes(n) == text


@pytest.mark.parametrize("text", ["512MiB", "2GiB", "1.5KiB", "0B"])
def test_format_bytes_round_trips_through_parse(text: str) -> None:
    assert format_bytes(parse_bytes(text)) == text


@pytest.mark.parametrize(
    ("seconds", "text"), [(0.5, "500ms"), (30, "30s"), (90, "90s"), (600, "10m"), (86400, "1d")]
)
def test_format_duration_is_short_and_exact(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
