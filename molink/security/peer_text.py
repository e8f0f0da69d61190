"""Text a peer sent, made fit to keep, log and show.

It lives in molink.security, which imports nothing of molink.transport: the transport's
checks, the per-peer limits and the pipeline all use it.
"""

from __future__ import annotations

# Text a peer sends that a node keeps, logs or passes on (a step's error, a refusal in
# an acknowledgement): at most this many characters, as the head's health answers keep.
MAX_PEER_TEXT_CHARS = 2048


def peer_text(text: str) -> str:
    """``text`` from a peer as a node may log and show it: cut to MAX_PEER_TEXT_CHARS,
    control characters (terminal escapes) replaced; line breaks and tabs stay, as a
    multi-line error has them."""
    kept = "".join(c if c.isprintable() or c in "\n\t" else "?" for c in text[:MAX_PEER_TEXT_CHARS])
    if len(text) > MAX_PEER_TEXT_CHARS:
        kept += f" ... ({len(text)} characters in all)"
    return kept
