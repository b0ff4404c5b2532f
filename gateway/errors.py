"""GatewayError: a failure that ends one request with a gRPC status and a message saying what to fix.

Raised anywhere below the servicer; the servicer turns it into `context.abort(code, message)`.
"""

from __future__ import annotations

import grpc


class GatewayError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"GatewayError({self.code.name}, {self.message!r})"


def invalid(field: str, problem: str) -> GatewayError:
    """INVALID_ARGUMENT naming the field: invalid("sampling.top_p", "must be in (0, 1]")."""
    return GatewayError(grpc.StatusCode.INVALID_ARGUMENT, f"{field} {problem}")
