"""Wording shared by what fedfer prints (logs, summaries, reports, errors).

`counted`: counts in words, "1 round", "3 rounds", "1 reply" — one helper so every message agrees with its
number; an admin reading "1 rounds" or "school(s)" has to stop and wonder whether the number or the word
is right. `one_line`: any text (an exception's, a reason from a file) as one line, because every error and
reason fedfer shows a person is one line.
"""

from __future__ import annotations


def counted(count: int, noun: str, plural: str = "") -> str:
    """`count` and the noun in the number it takes: ``counted(1, "round")`` -> "1 round", ``counted(0, "round")``
    -> "0 rounds"; `plural` for a noun that does not just take an s (``counted(2, "reply", "replies")``)."""
    return f"{count} {noun if count == 1 else (plural or noun + 's')}"


def one_line(text: object) -> str:
    """`text` with every run of whitespace (newlines included) made one space, and no space at either end."""
    return " ".join(str(text).split())
