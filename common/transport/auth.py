"""The cluster secret and the HMAC proofs that authenticate KV pairing. Torch-free.

Workers of one deployment share a secret (--cluster-secret-file, --cluster-secret, or the
GLMSERVE_CLUSTER_SECRET environment variable). With it, pairing is mutually authenticated:

1. prefill -> decode Pair RPC: metadata `PAIR_AUTH_KEY` = "<unix ms>.<nonce>.<mac>", the MAC over
   (prefill worker id, time, nonce). Decode refuses a missing or wrong MAC, a time more than
   MAX_SKEW_S away, or a nonce it has already accepted (a replay) with UNAUTHENTICATED.
2. decode -> prefill: trailing metadata `PAIR_PROOF_KEY` = MAC over (that nonce, group name), so a
   prefill never sends KV to a decode worker that does not hold the secret.
3. the store rendezvous: the group name is random (decode's challenge) and only ever travels in an
   authenticated Pair response; prefill's hello carries the MAC over it, and decode builds no
   group until the hello checks out.

No message, log line or status ever contains the secret or a key derived from it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
import time

ENV = "GLMSERVE_CLUSTER_SECRET"
PAIR_AUTH_KEY = "x-glmserve-pair-auth"
PAIR_PROOF_KEY = "x-glmserve-pair-proof"
MAX_SKEW_S = 120.0
MIN_SECRET_BYTES = 16


class AuthError(Exception):
    """A peer failed to prove the cluster secret; the message says what was wrong, never the secret."""


def load_secret(value: str | None, path: str | None) -> bytes | None:
    """--cluster-secret, else --cluster-secret-file, else $GLMSERVE_CLUSTER_SECRET; None when none is set."""
    if value is None and path is not None:
        with open(path, encoding="utf-8") as f:
            value = f.read().strip()
    if value is None:
        value = os.environ.get(ENV) or None
    if value is None:
        return None
    if len(value.encode()) < MIN_SECRET_BYTES:
        raise ValueError(f"the cluster secret must be at least {MIN_SECRET_BYTES} bytes")
    return value.encode()


def new_secret() -> str:
    return secrets.token_hex(32)


def _mac(secret: bytes, *parts: str) -> str:
    return hmac.new(secret, "\x00".join(parts).encode(), hashlib.sha256).hexdigest()


class PairAuth:
    """One worker's side of pairing authentication (secret None: pairing is open)."""

    def __init__(self, secret: bytes | None) -> None:
        self._secret = secret
        self._seen: dict[str, float] = {}  # accepted nonce -> when it may be forgotten
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:  # a TP rank process gets the worker's config pickled
        return {"_secret": self._secret}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["_secret"])

    def __repr__(self) -> str:
        return f"PairAuth(enabled={self.enabled})"

    @property
    def enabled(self) -> bool:
        return self._secret is not None

    def request_token(self, prefill_id: str) -> tuple[str, str]:
        """Prefill: (metadata value, nonce) for one Pair call."""
        assert self._secret is not None
        ts, nonce = str(int(time.time() * 1000)), secrets.token_hex(16)
        return f"{ts}.{nonce}.{_mac(self._secret, 'pair-request', prefill_id, ts, nonce)}", nonce

    def check_request(self, token: str | None, prefill_id: str) -> str:
        """Decode: the nonce of a valid, fresh, unseen token; AuthError otherwise."""
        assert self._secret is not None
        if not token:
            raise AuthError("pairing refused: the prefill worker sent no cluster-secret proof "
                            "(start every worker of the deployment with the same cluster secret)")
        try:
            ts, nonce, mac = token.split(".")
            age = abs(time.time() - int(ts) / 1000)
        except ValueError:
            raise AuthError("pairing refused: malformed cluster-secret proof") from None
        if not hmac.compare_digest(mac, _mac(self._secret, "pair-request", prefill_id, ts, nonce)):
            raise AuthError("pairing refused: the prefill worker's cluster secret does not match this worker's")
        if age > MAX_SKEW_S:
            raise AuthError(f"pairing refused: proof is {age:.0f}s old (more than {MAX_SKEW_S:.0f}s; "
                            "are the clocks set?)")
        now = time.monotonic()
        with self._lock:
            self._seen = {n: t for n, t in self._seen.items() if t > now}
            if nonce in self._seen:
                raise AuthError("pairing refused: this proof was already used (a replay)")
            self._seen[nonce] = now + 2 * MAX_SKEW_S
        return nonce

    def response_proof(self, nonce: str, group_name: str) -> str:
        assert self._secret is not None
        return _mac(self._secret, "pair-response", nonce, group_name)

    def check_response(self, proof: str | None, nonce: str, group_name: str) -> None:
        """Prefill: the decode worker proved the secret for this call; AuthError otherwise."""
        assert self._secret is not None
        if not proof or not hmac.compare_digest(proof, _mac(self._secret, "pair-response", nonce, group_name)):
            raise AuthError("pairing refused: the decode worker did not prove the cluster secret "
                            "(its secret differs, or it runs without one)")

    def hello_proof(self, group_name: str) -> bytes:
        """What prefill appends to the store hello of `group_name` (b"" without a secret)."""
        if self._secret is None:
            return b""
        return b" glmserve-auth " + _mac(self._secret, "hello", group_name).encode()
