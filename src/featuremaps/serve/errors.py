"""The one error type the viewer's routes raise: an HTTP status and a one-line message."""

from __future__ import annotations


class ApiError(Exception):
    """An error answered with an HTTP status, a one-line message and optional headers.

    Example:
        >>> raise ApiError(404, "no job 'x'")  # doctest: +SKIP
    """

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}
