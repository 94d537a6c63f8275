"""Errors a user can act on: each names the slide or config key and says what to do."""

from __future__ import annotations


class DsfError(Exception):
    """Base class; the CLI prints the message (no traceback) and exits with status 2."""


#: How a bad slide leaves the run, in slide messages (a slide comes from a folder or a sheet).
REMOVE_SLIDE = "remove it (from the slide folder, or its row from the sheet)"


class ConfigError(DsfError):
    """A config value or slide-sheet entry is invalid; the message names the key or column."""


def some(items: list[str], most: int = 3) -> str:
    """The first `most` of `items` for a message: 'a, b, c and 4 more'."""
    more = f" and {len(items) - most} more" if len(items) > most else ""
    return ", ".join(items[:most]) + more


def found_at_start(problems: list[str], what: str, fix: str) -> ConfigError:
    """The one error of a start-up check (slides, annotations) that found `problems`: how many
    of the run's `what` (its sheet's or folder's) cannot be used, the `fix`, and the first ten
    messages."""
    shown = "\n".join(f"  {p}" for p in problems[:10])
    more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
    return ConfigError(
        f"{len(problems)} of the run's {what} cannot be used; fix them ({fix}) before "
        f"running:\n{shown}{more}"
    )


class SlideError(DsfError):
    """A slide cannot be opened or read; the message names the slide and the fix."""

    def __init__(self, slide: str, message: str) -> None:
        self.slide = slide
        super().__init__(f"slide {slide!r}: {message}")


class TissueError(SlideError):
    """No usable tissue on a slide."""


class AnnotationError(SlideError):
    """An annotation does not fit its slide (outside it, unknown class, unreadable)."""
