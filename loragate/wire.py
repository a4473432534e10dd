"""Pieces of the OpenAI wire format that both the gateway and the load generator read."""

from __future__ import annotations


def choice_text(choice: object, chat: bool) -> str:
    """The generated text of one ``choices[]`` entry: ``text`` for completions; for chat, the
    ``message`` content (whole answers) or the ``delta`` content (streamed chunks)."""
    if not isinstance(choice, dict):
        return ""
    if chat:
        part = choice.get("message") or choice.get("delta") or {}
        return str(part.get("content") or "") if isinstance(part, dict) else ""
    return str(choice.get("text") or "")
