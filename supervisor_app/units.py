"""Byte sizes and durations as people write them in YAML: "512MiB", "1.5G", "30s", "10m".

Sizes: bare numbers are bytes; KiB/MiB/GiB/TiB/PiB (and Ki/Mi/Gi/Ti/Pi) are binary;
kB/MB/GB/TB/PB (and k/K/M/G/T/P) are decimal, as in Kubernetes quantities. Unit letters are matched
case-insensitively because nobody means "megabit" in a memory quota.

Durations: bare numbers are seconds; units ms, s, m, h, d, and they may be chained
("1h30m").
"""

from __future__ import annotations

import math
import re

_BYTE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ki": 1024,
    "kib": 1024,
    "mi": 1024**2,
    "mib": 1024**2,
    "gi": 1024**3,
    "gib": 1024**3,
    "ti": 1024**4,
    "tib": 1024**4,
    "p": 1000**5,
    "pb": 1000**5,
    "pi": 1024**5,
    "pib": 1024**5,
}

_DURATION_UNITS: dict[str, float] = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"
_SIZE_RE = re.compile(rf"^{_NUMBER}\s*([A-Za-z]*)$")
_DURATION_PART_RE = re.compile(rf"{_NUMBER}\s*([A-Za-z]*)\s*")


def parse_bytes(v: str | int) -> int:
    """Return a byte count for ``v`` ("512MiB", "1.5G", "300MB", "1024", 4096)."""
    if isinstance(v, bool):  # bool is an int subclass; `memory: yes` is a typo, not 1 byte
        raise ValueError(f"invalid size {v!r}: expected a number of bytes or e.g. '512MiB'")
    if isinstance(v, int):
        if v < 0:
            raise ValueError(f"invalid size {v!r}: must not be negative")
        return v
    if isinstance(v, float):
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"invalid size {v!r}: must be a finite, non-negative number")
        return round(v)
    if not isinstance(v, str):
        raise ValueError(f"invalid size {v!r}: expected a string like '512MiB' or an integer")
    m = _SIZE_RE.match(v.strip())
    if not m:
        raise ValueError(f"invalid size {v!r}: expected e.g. '512MiB', '2GiB', '300MB' or '1024'")
    number, unit = m.groups()
    factor = _BYTE_UNITS.get(unit.lower())
    if factor is None:
        raise ValueError(
            f"invalid size {v!r}: unknown unit {unit!r} (use B, KiB, MiB, GiB, TiB, PiB, kB, MB, GB, TB, PB)"
        )
    size = float(number) * factor
    if not math.isfinite(size):  # "9" * 400: a float overflows to inf
        raise ValueError(f"invalid size {v!r}: too large")
    return round(size)


def parse_duration(v: str | int | float) -> float:
    """Return seconds for ``v`` ("500ms", "30s", "10m", "2h", "7d", "1h30m", 5, 0.25)."""
    if isinstance(v, bool):
        raise ValueError(f"invalid duration {v!r}: expected seconds or e.g. '30s'")
    if isinstance(v, int | float):
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"invalid duration {v!r}: must be a finite, non-negative number")
        return float(v)
    if not isinstance(v, str):
        raise ValueError(f"invalid duration {v!r}: expected a string like '30s' or a number")
    text = v.strip()
    if not text:
        raise ValueError(f"invalid duration {v!r}: empty")
    if text.startswith("-"):
        raise ValueError(f"invalid duration {v!r}: must not be negative "
                         "(0 or more, e.g. '0s', '30s', '10m', '2h')")
    total = 0.0
    pos = 0
    while pos < len(text):
        m = _DURATION_PART_RE.match(text, pos)
        if not m:
            raise ValueError(f"invalid duration {v!r}: expected e.g. '500ms', '30s', '10m', '2h'")
        number, unit = m.groups()
        if not unit and (pos > 0 or m.end() < len(text)):
            # "1h30" is ambiguous: minutes or seconds? Make the author say.
            raise ValueError(f"invalid duration {v!r}: every part needs a unit when chained")
        factor = _DURATION_UNITS.get(unit.lower() if unit else "s")
        if factor is None:
            raise ValueError(f"invalid duration {v!r}: unknown unit {unit!r} (use ms, s, m, h, d)")
        total += float(number) * factor
        pos = m.end()
    if not math.isfinite(total):  # "9" * 400: a float overflows to inf
        raise ValueError(f"invalid duration {v!r}: too large")
    return total


def format_bytes(n: int | float) -> str:
    """Short binary rendering for logs and status: 512 -> "512B", 1536 -> "1.5KiB"."""
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, factor in (("PiB", 1024**5), ("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= factor:
            text = f"{n / factor:.1f}".removesuffix(".0")
            return f"{sign}{text}{unit}"
    return f"{sign}{round(n)}B"


def format_duration(seconds: float) -> str:
    """Short rendering for messages: 0.5 -> "500ms", 90 -> "90s", 600 -> "10m"."""
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    for unit, factor in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= factor and seconds % factor == 0:
            return f"{seconds / factor:g}{unit}"
    return f"{seconds:g}s"
