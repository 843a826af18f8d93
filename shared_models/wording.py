"""Counts in words for what fedfer prints (logs, summaries, reports): "1 round", "3 rounds", "1 reply".

One helper so every message agrees with its number; an admin reading "1 rounds" or "school(s)" has to
stop and wonder whether the number or the word is right.
"""

from __future__ import annotations


def counted(count: int, noun: str, plural: str = "") -> str:
    """`count` and the noun in the number it takes: ``counted(1, "round")`` -> "1 round", ``counted(0, "round")``
    -> "0 rounds"; `plural` for a noun that does not just take an s (``counted(2, "reply", "replies")``)."""
    return f"{count} {noun if count == 1 else (plural or noun + 's')}"
