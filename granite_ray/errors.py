"""The two ways a command ends early: the user can fix the input (one line, exit 2), or the work failed
(one line, exit 1; the workers' tracebacks are in the Ray logs above it)."""

from __future__ import annotations


class UserError(Exception):
    """A config, file or resource request the user can fix; the message says what and how."""


class TrainingFailed(RuntimeError):
    """The Ray Train run ended in an error after retries; the message is its last line."""
