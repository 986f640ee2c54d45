"""The error a request can be answered with: an HTTP status and a one-line message."""

from __future__ import annotations


class RequestError(ValueError):
    """A request the server cannot answer as asked; ``status`` is the 4xx (or 503) to send."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message


def bad_request(message: str) -> RequestError:
    return RequestError(422, "invalid_request", message)


def unknown_item(message: str) -> RequestError:
    return RequestError(422, "unknown_item", message)


def unknown_user(message: str) -> RequestError:
    return RequestError(404, "unknown_user", message)
