"""The gateway's one error tree.

Every error the gateway reports to a client is a :class:`GatewayError`; each
class carries the HTTP status and the OpenAI ``type``/``code`` it renders as, so
the server needs exactly one handler that turns any of them into the OpenAI
envelope ``{"error": {"message", "type", "param", "code"}}``.

    GatewayError                      (500, "server_error")
    ├── InvalidRequestError           (400, "invalid_request_error")  bad request; `param` names the field
    │   └── ContextLengthExceededError (400, code "context_length_exceeded")
    ├── AuthenticationError           (401, "invalid_request_error", code "invalid_api_key")
    ├── ModelNotFoundError            (404, "invalid_request_error", code "model_not_found")
    ├── ResponseNotFoundError         (404, "invalid_request_error", code "response_not_found")  unknown,
    │                                 expired or another API key's stored response
    ├── PayloadTooLargeError          (413, "invalid_request_error")  body over the configured limit
    ├── ConcurrencyLimitError         (429, "requests", code "rate_limit_exceeded")  per-key limit; Retry-After
    ├── DescriptorsExhaustedError     (503, "server_error", code "descriptors_exhausted")  the gateway's own
    │                                 RLIMIT_NOFILE reached (EMFILE/ENFILE); Retry-After
    ├── ShuttingDownError             (503, "server_error")  cut at the end of --shutdown-grace
    ├── StoreUnavailableError         (503, "server_error", code "store_unavailable")  the response store's
    │                                 database failed or cannot be reached; Retry-After
    └── UpstreamError                 (502, "server_error")  TGI, or the way to it, failed
        ├── TGIValidationError        (400, "invalid_request_error")  TGI refused a value
        │   └── TGIContextLengthError (400, code "context_length_exceeded")
        ├── TGIOverloadedError        (429, "requests", code "rate_limit_exceeded")  Retry-After
        ├── TGIGenerationError        (502, "server_error")  TGI failed while generating
        ├── TGIUnavailableError       (503, "server_error")  TGI unreachable, or unhealthy
        ├── TGITimeoutError           (504, "server_error", code "timeout")  TGI silent for too long
        ├── TGIProtocolError          (502, "server_error")  a cut stream, a non-SSE body
        └── TGIRejectedError          (502, "server_error")  TGI refused the gateway (key, URL)

Upstream errors are raised by :mod:`tgi_gateway.tgi.protocol` (``map_tgi_error`` maps TGI's
``{"error", "error_type"}`` bodies and stream events, and HTTP statuses, to these classes). Their
:attr:`UpstreamError.headers` are the extra HTTP headers the response should carry: ``Retry-After``
on TGIOverloadedError, ``x-should-retry: false`` on TGIValidationError and TGIRejectedError (the
OpenAI SDK honours both). TGIValidationError is also an InvalidRequestError, and TGIContextLengthError
also a ContextLengthExceededError, so code that handles the gateway's own 400s handles TGI's too.

Errors that stop the gateway from starting at all (a model that is not a
Functionary model, unreadable tokenizer files) are :class:`ConfigurationError`;
they are not HTTP errors and never reach a client.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar


class GatewayError(Exception):
    """An error the client sees: `message` and `param` as given; HTTP status, OpenAI ``type`` and ``code``
    from the class (``code`` may be overridden per instance). :meth:`to_dict` is the response body,
    :attr:`headers` the extra response headers."""

    status_code: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    @property
    def headers(self) -> dict[str, str]:
        """Extra HTTP headers for the error response (e.g. ``Retry-After``); none by default."""
        return {}

    def to_dict(self) -> dict[str, Any]:
        """The OpenAI error envelope."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, param={self.param!r}, code={self.code!r})"


class InvalidRequestError(GatewayError):
    """The request is wrong (400); `param` names the offending field in OpenAI's notation
    (``messages[3].tool_call_id``), or is None when no single field is at fault."""

    status_code = 400
    type = "invalid_request_error"


class ContextLengthExceededError(InvalidRequestError):
    """The prompt, or the prompt plus ``max_tokens``, is longer than the model's context (400)."""

    code = "context_length_exceeded"


class ModelNotFoundError(GatewayError):
    """The request names a model this gateway does not serve (404, like OpenAI's)."""

    status_code = 404
    type = "invalid_request_error"
    code = "model_not_found"


class ResponseNotFoundError(GatewayError):
    """No stored response with this id for this API key: never stored, deleted, expired, or stored by
    another key (the same 404 in every case, so a key cannot tell another key's ids exist)."""

    status_code = 404
    type = "invalid_request_error"
    code = "response_not_found"

    def __init__(self, response_id: str) -> None:
        super().__init__(f"No response found with id '{response_id}'.", param="response_id")


class AuthenticationError(GatewayError):
    """No API key, or not one of the gateway's (``--api-key``). Rendered like OpenAI's own 401."""

    status_code = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PayloadTooLargeError(InvalidRequestError):
    """The request body is larger than the configured limit."""

    status_code = 413


class ConcurrencyLimitError(GatewayError):
    """This API key already has its maximum of requests in flight (429 with ``Retry-After``)."""

    status_code = 429
    type = "requests"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class DescriptorsExhaustedError(GatewayError):
    """The gateway itself has no file descriptor left (``EMFILE``/``ENFILE``) to open a connection to TGI:
    its own overload, not TGI's fault (503 with ``Retry-After``; ``/health`` reports it too)."""

    status_code = 503
    code = "descriptors_exhausted"

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class ShuttingDownError(GatewayError):
    """The gateway is stopping and its shutdown grace period is over: the request was cut (503; the OpenAI
    SDKs retry it, on another instance behind a load balancer)."""

    status_code = 503

    def __init__(self, message: str = "The gateway is shutting down: this answer was cut when its shutdown "
                 "grace period ended; retry the request.") -> None:  # fmt: skip
        super().__init__(message)


class StoreUnavailableError(GatewayError):
    """The response store's database failed or cannot be reached (503 with ``Retry-After``); the cause is in
    the gateway's log, not in the message (it may name hosts)."""

    status_code = 503
    code = "store_unavailable"

    def __init__(self, message: str = "The response store is unavailable; retry shortly.") -> None:
        super().__init__(message)

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class UpstreamError(GatewayError):
    """TGI failed, or the way to it did: the client's request may well have been fine.

    ``headers`` are extra HTTP headers for the error response: the class's ``default_headers``
    updated with the ``headers`` given to the constructor.
    """

    status_code = 502
    type = "server_error"
    default_headers: ClassVar[Mapping[str, str]] = {}

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, param=param, code=code)
        self._headers = dict(headers or {})

    @property
    def headers(self) -> dict[str, str]:
        return {**self.default_headers, **self._headers}


class TGIValidationError(UpstreamError, InvalidRequestError):
    """TGI refused a value of the request (its message is kept verbatim): the client's fault."""

    status_code = 400
    type = "invalid_request_error"
    default_headers: ClassVar[Mapping[str, str]] = {"x-should-retry": "false"}


class TGIContextLengthError(TGIValidationError, ContextLengthExceededError):
    """The prompt, or the prompt plus ``max_tokens``, does not fit TGI's token limits."""

    code = "context_length_exceeded"


class TGIOverloadedError(UpstreamError):
    """TGI has ``max_concurrent_requests`` in flight (or the gateway's pool to it is exhausted).

    Rendered like OpenAI's own request rate limit (429, type ``requests``, code
    ``rate_limit_exceeded``) with ``Retry-After: <retry_after>`` seconds.
    """

    status_code = 429
    type = "requests"
    code = "rate_limit_exceeded"

    def __init__(
        self,
        message: str,
        *,
        retry_after: int = 1,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        headers = {"Retry-After": str(retry_after), **(headers or {})}
        super().__init__(message, param=param, code=code, headers=headers)
        self.retry_after = retry_after


class TGIGenerationError(UpstreamError):
    """TGI failed while generating (a shard error such as CUDA out of memory, an incomplete generation)."""


class TGIUnavailableError(UpstreamError):
    """TGI cannot be reached (refused, reset, timed out before answering), or says it is unhealthy."""

    status_code = 503


class TGITimeoutError(UpstreamError):
    """TGI accepted the request but sent nothing for too long: no first token within the first-token
    timeout (a full queue, a hung TGI), a silence between two events longer than the read timeout, or (a
    non-stream request) no whole answer within the request timeout."""

    status_code = 504
    code = "timeout"


class TGIProtocolError(UpstreamError):
    """TGI's answer does not follow its protocol: a stream cut before its end, a non-SSE body, bad JSON."""


class TGIRejectedError(UpstreamError):
    """TGI refused the gateway itself: a missing or wrong API key, a wrong URL (404), or a request body
    TGI could not read (a gateway bug). Retrying does not help."""

    default_headers: ClassVar[Mapping[str, str]] = {"x-should-retry": "false"}


class ConfigurationError(Exception):
    """The gateway cannot start with this configuration (reported on the console, exit non-zero)."""
