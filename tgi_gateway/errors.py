"""The gateway's one error tree.

Every error the gateway reports to a client is a :class:`GatewayError`; each
class carries the HTTP status and the OpenAI ``type``/``code`` it renders as, so
the server needs exactly one handler that turns any of them into the OpenAI
envelope ``{"error": {"message", "type", "param", "code"}}``.

    GatewayError                      (500, "server_error")
    ├── InvalidRequestError           (400, "invalid_request_error")  bad request; `param` names the field
    │   └── ContextLengthExceededError (400, code "context_length_exceeded")
    ├── ModelNotFoundError            (404, "invalid_request_error", code "model_not_found")
    └── ...                           upstream (TGI) errors are added by the server layer

Errors that stop the gateway from starting at all (a model that is not a
Functionary model, unreadable tokenizer files) are :class:`ConfigurationError`;
they are not HTTP errors and never reach a client.
"""

from __future__ import annotations

from typing import Any


class GatewayError(Exception):
    status_code: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, Any]:
        """The OpenAI error envelope."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, param={self.param!r}, code={self.code!r})"


class InvalidRequestError(GatewayError):
    status_code = 400
    type = "invalid_request_error"


class ContextLengthExceededError(InvalidRequestError):
    code = "context_length_exceeded"


class ModelNotFoundError(GatewayError):
    status_code = 404
    type = "invalid_request_error"
    code = "model_not_found"


class ConfigurationError(Exception):
    """The gateway cannot start with this configuration (reported on the console, exit non-zero)."""
