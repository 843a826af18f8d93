"""Label sets. Every reader maps its benchmark's codes onto one of these, in this order.

The canonical order is FER2013's (0 angry … 6 neutral) so a FER2013 file needs no remapping and
every confusion matrix in fedfer reads the same way. Contempt, where a benchmark has it, is 7.
"""

from __future__ import annotations

FER7: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
FER8: tuple[str, ...] = FER7 + ("contempt",)

LABEL_SETS: dict[str, tuple[str, ...]] = {"fer7": FER7, "fer8": FER8}


def label_set(name: str) -> tuple[str, ...]:
    """The class names of a label set by name (`fer7`, `fer8`)."""
    try:
        return LABEL_SETS[name]
    except KeyError:
        raise ValueError(f"unknown label set '{name}' (known: {', '.join(LABEL_SETS)})") from None

