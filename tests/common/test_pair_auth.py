"""Pairing authentication (common/transport/auth.py): each proof checks only with the same secret,
a proof is used once, and nothing the peer sees contains the secret."""

from __future__ import annotations

import pytest

from common.transport.auth import AuthError, PairAuth, load_secret

SECRET, OTHER = b"s" * 32, b"o" * 32


def test_request_and_response_proofs_need_the_same_secret() -> None:
    prefill, decode = PairAuth(SECRET), PairAuth(SECRET)
    token, nonce = prefill.request_token("prefill0")
    assert decode.check_request(token, "prefill0") == nonce
    proof = decode.response_proof(nonce, "kv/prefill0/g1")
    prefill.check_response(proof, nonce, "kv/prefill0/g1")
    with pytest.raises(AuthError, match="decode worker did not prove"):
        prefill.check_response(PairAuth(OTHER).response_proof(nonce, "kv/prefill0/g1"), nonce, "kv/prefill0/g1")
    with pytest.raises(AuthError, match="decode worker did not prove"):
        prefill.check_response(None, nonce, "kv/prefill0/g1")


@pytest.mark.parametrize("token", [None, "", "garbage", "1.2.3", PairAuth(OTHER).request_token("prefill0")[0]])
def test_bad_request_proofs_are_refused(token) -> None:
    with pytest.raises(AuthError, match="pairing refused") as err:
        PairAuth(SECRET).check_request(token, "prefill0")
    assert SECRET.decode() not in str(err.value)


def test_a_proof_is_bound_to_its_worker_and_used_once() -> None:
    decode = PairAuth(SECRET)
    token, _ = PairAuth(SECRET).request_token("prefill0")
    with pytest.raises(AuthError, match="does not match"):
        decode.check_request(token, "prefill1")
    decode.check_request(token, "prefill0")
    with pytest.raises(AuthError, match="replay"):
        decode.check_request(token, "prefill0")


def test_hello_proof_depends_on_group_and_secret() -> None:
    a = PairAuth(SECRET).hello_proof("kv/p/g1")
    assert a and a != PairAuth(SECRET).hello_proof("kv/p/g2") and a != PairAuth(OTHER).hello_proof("kv/p/g1")
    assert PairAuth(None).hello_proof("kv/p/g1") == b"" and not PairAuth(None).enabled
    assert "s" * 32 not in repr(PairAuth(SECRET))


def test_load_secret_sources(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("GLMSERVE_CLUSTER_SECRET", raising=False)
    assert load_secret(None, None) is None
    monkeypatch.setenv("GLMSERVE_CLUSTER_SECRET", "e" * 20)
    assert load_secret(None, None) == b"e" * 20
    f = tmp_path / "secret"
    f.write_text("f" * 20 + "\n")
    assert load_secret(None, str(f)) == b"f" * 20
    assert load_secret("v" * 20, str(f)) == b"v" * 20
    with pytest.raises(ValueError, match="at least"):
        load_secret("short", None)
