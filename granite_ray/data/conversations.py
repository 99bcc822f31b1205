"""Multi-turn conversations as retrieval queries (Granite R2, conversational adaptation).

The turns are written most recent first, each tagged with its speaker, so that truncating the
text at a token budget drops the oldest turns, never the question being asked now.
"""

from __future__ import annotations

from granite_ray.data.rows import RowError


def format_conversation(turns: list[dict]) -> str:
    """Turns in reverse order (most recent first), each tagged with its speaker."""
    lines = []
    for turn in reversed(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("text"), str):
            raise RowError("a conversation turn needs a text (string)")
        lines.append(f"|{turn.get('speaker', 'user')}|: {turn['text'].strip()}")
    return "\n".join(lines)
