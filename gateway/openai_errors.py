"""GatewayError -> OpenAI error envelope and HTTP status (docs/openai_http.md §Errors).

The body is `{"error": {"message", "type", "param", "code"}}`; `param` is the public name of the
request field at fault. The request core names sampling fields as the gRPC API does
("sampling.top_p"), so those names are rewritten to the top-level JSON names here.
"""

from __future__ import annotations

import grpc

from gateway.errors import GatewayError

Code = grpc.StatusCode

# gRPC status -> (HTTP status, OpenAI error type, default code)
_STATUS: dict[grpc.StatusCode, tuple[int, str, str]] = {
    Code.INVALID_ARGUMENT: (400, "invalid_request_error", "invalid_value"),
    Code.OUT_OF_RANGE: (400, "invalid_request_error", "invalid_value"),
    Code.UNAUTHENTICATED: (401, "authentication_error", "invalid_api_key"),
    Code.NOT_FOUND: (404, "invalid_request_error", "not_found"),
    Code.ALREADY_EXISTS: (409, "invalid_request_error", "duplicate_request_id"),
    Code.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "server_overloaded"),
    Code.CANCELLED: (499, "invalid_request_error", "cancelled"),
    Code.INTERNAL: (500, "server_error", "internal_error"),
    Code.UNKNOWN: (500, "server_error", "internal_error"),
    Code.UNAVAILABLE: (503, "server_error", "no_healthy_workers"),
    Code.FAILED_PRECONDITION: (503, "server_error", "no_healthy_workers"),
    Code.ABORTED: (503, "server_error", "no_healthy_workers"),
    Code.DEADLINE_EXCEEDED: (504, "server_error", "timeout"),
}
# request-core field names that differ over HTTP (prefix match)
_PUBLIC_PREFIXES = (("sampling.", ""), ("thinking.budget", "thinking_token_budget"), ("request_id", "rid"),
                    ("tokens.ids", "prompt"), ("text", "prompt"))


def public_field(field: str | None) -> str | None:
    if field is None:
        return None
    for internal, public in _PUBLIC_PREFIXES:
        if field.startswith(internal):
            return public + field[len(internal):]
    return field


def error_body(status_code: grpc.StatusCode, message: str, field: str | None = None,
               code: str | None = None) -> tuple[int, dict, dict[str, str]]:
    """(HTTP status, envelope, extra headers) for one error."""
    status, kind, default_code = _STATUS.get(status_code, (500, "server_error", "internal_error"))
    param = public_field(field)
    if field and param != field and message.startswith(field):
        message = param + message[len(field):]
    if code is None:
        code = "context_length_exceeded" if "maximum context length" in message else default_code
    headers = {}
    if status in (429, 503):
        headers["Retry-After"] = "1"
    if status == 409:
        headers["x-should-retry"] = "false"  # the openai client would retry a 409 otherwise
    return status, {"error": {"message": message, "type": kind, "param": param, "code": code}}, headers


def from_gateway_error(e: GatewayError) -> tuple[int, dict, dict[str, str]]:
    return error_body(e.code, e.message, e.field, e.reason)
