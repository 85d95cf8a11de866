"""AI adapters the vision and feedback handlers call.

- `workers.learning.ai.ollama`: one non-streaming `/api/chat` call, errors classified into
  `TransientError` / `PermanentError` with the caller's codes.
- `workers.learning.ai.vision`: page images → text (`stub`, `ollama`, `tesseract`).
- `workers.learning.ai.feedback`: text + criteria → feedback markdown and a `criteria.v2`
  analysis (`stub`, `dspy`, `ollama`).

Nothing here imports DSPy at module level: it costs about a second and 350 MB,
and only feedback children need it.
"""

from __future__ import annotations

import os


def ai_backend() -> str:
    """AI_BACKEND: "stub" (default, no model) or "local" (Ollama); anything else is a config error."""
    backend = (os.environ.get("AI_BACKEND") or "stub").strip().lower()
    if backend not in ("stub", "local"):
        raise ValueError(f"AI_BACKEND must be stub or local, got {backend!r}")
    return backend
