"""GatewayError: a failure that ends one request with a gRPC status and a message saying what to fix.

Raised anywhere below the public surfaces; the gRPC servicer turns it into `context.abort(code,
message)`, the HTTP adapter into an OpenAI error body whose `param` is `field` (openai_errors.py).
"""

from __future__ import annotations

import grpc


class GatewayError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, field: str | None = None,
                 reason: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field    # the request field at fault, as the message names it (None: not one field)
        self.reason = reason  # a machine-readable cause for HTTP's error `code` ("unsupported_parameter")

    def __repr__(self) -> str:
        return f"GatewayError({self.code.name}, {self.message!r})"


def invalid(field: str, problem: str) -> GatewayError:
    """INVALID_ARGUMENT naming the field: invalid("sampling.top_p", "must be in (0, 1]")."""
    return GatewayError(grpc.StatusCode.INVALID_ARGUMENT, f"{field} {problem}", field)


def unsupported(field: str, why: str) -> GatewayError:
    """A request field glmserve does not implement (yet): INVALID_ARGUMENT, `unsupported_parameter`."""
    return GatewayError(grpc.StatusCode.INVALID_ARGUMENT, f"{field} is not supported: {why}", field,
                        "unsupported_parameter")
