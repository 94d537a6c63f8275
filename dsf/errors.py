"""Errors a user can act on: each names the slide or config key and says what to do."""

from __future__ import annotations


class DsfError(Exception):
    """Base class; the CLI prints the message (no traceback) and exits with status 2."""


class ConfigError(DsfError):
    """A config value or slide-sheet entry is invalid; the message names the key or column."""


class SlideError(DsfError):
    """A slide cannot be opened or read; the message names the slide and the fix."""

    def __init__(self, slide: str, message: str) -> None:
        self.slide = slide
        super().__init__(f"slide {slide!r}: {message}")


class TissueError(SlideError):
    """No usable tissue on a slide."""


class AnnotationError(SlideError):
    """An annotation does not fit its slide (outside it, unknown class, unreadable)."""
