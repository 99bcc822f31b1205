"""Errors a client caused, and the OpenAI-style body every error response carries.

Model replicas refuse with `InputError` what only they can check (token lengths, token ids, dimensions);
it reaches the ingress as a returned value and is raised there, so one handler answers every refusal.
"""

from __future__ import annotations


class InputError(ValueError):
    """A request the server will not process; answered with `status` and the field at fault (`param`)."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value", status: int = 400) -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error shape; the official clients read `message` from it."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
