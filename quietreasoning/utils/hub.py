"""One check before any Hugging Face Hub download: offline flags or an unreachable host fail
in seconds with one line naming what was wanted and the local alternative, instead of the
libraries' long retry loops."""

from __future__ import annotations

import os
import socket

from quietreasoning.config import DataError

HUB_HOST = ("huggingface.co", 443)
OFFLINE_FLAGS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def offline_reason(timeout: float = 3.0) -> str | None:
    """Why the hub cannot be reached now (an offline flag, or no connection), or None."""
    for flag in OFFLINE_FLAGS:
        if os.environ.get(flag, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{flag}={os.environ[flag]}"
    try:
        socket.create_connection(HUB_HOST, timeout=timeout).close()
    except OSError as e:
        return f"{HUB_HOST[0]} unreachable: {e.strerror or type(e).__name__}"
    return None


def require_hub(what: str, alternative: str) -> None:
    """Raises DataError("<what> needs the Hugging Face Hub, which is offline (...); <alternative>")
    unless the hub answers."""
    reason = offline_reason()
    if reason:
        raise DataError(f"{what} needs the Hugging Face Hub, which is offline ({reason}); {alternative}")
