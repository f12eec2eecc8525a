"""The one exception type the command line turns into a one-line error message, and the
helpers that keep what a message echoes of the input short."""

from collections.abc import Iterable


class NinError(Exception):
    """A problem the user can fix; the message says what is wrong and what to do."""


def cut(text: str, limit: int = 80) -> str:
    """`text`, or its start and end around the count of characters left out."""
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}… ({len(text) - 2 * half:,} more characters) …{text[-half:]}"


def some(items: Iterable[object], limit: int = 5) -> str:
    """The first `limit` items, comma-separated (each cut short), and how many more there are."""
    items = list(items)
    shown = ", ".join(cut(str(item), 40) for item in items[:limit])
    return shown + (f" and {len(items) - limit:,} more" if len(items) > limit else "")
