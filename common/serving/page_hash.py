"""Chained page keys of the prefix cache (torch-free, so the gateway can compute the same keys).

Page i of a token sequence is keyed by `h_i = BLAKE2b(h_{i-1} || its page_size token ids as
little-endian uint32)[:16]`, with `h_{-1}` a root that names what the KV depends on besides the
tokens (model, KV layout, salt). Equal keys mean equal prefixes up to a hash collision, which the
prefix index rules out by comparing the stored token ids. (The first 16 bytes of the full 64-byte
digest rather than BLAKE2b's own 16-byte variant: the same strength for this use, and half the
cost a call in CPython, which parses a keyword argument per call; workers key every page of every
prompt on their engine thread.)
"""

from __future__ import annotations

import hashlib
import struct
import sys
from array import array
from collections.abc import Sequence

DIGEST_BYTES = 16


def root_key(namespace: str, salt: str = "") -> bytes:
    """The key before page 0: different namespaces or salts never share a page."""
    return hashlib.blake2b(f"glmserve-kv-v1\0{namespace}\0{salt}".encode(), digest_size=DIGEST_BYTES).digest()


def page_key(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The key of one full page whose predecessor's key is `parent`."""
    return packed_key(parent, struct.pack(f"<{len(tokens)}I", *tokens))


def pack(tokens: Sequence[int]) -> memoryview:
    """Token ids as the little-endian uint32 bytes the keys hash (4 bytes a token), packed once for
    every page of a sequence."""
    data = array("I", tokens)
    if sys.byteorder != "little":
        data.byteswap()
    return memoryview(data.tobytes())


def packed_key(parent: bytes, page: bytes | memoryview, _blake2b=hashlib.blake2b) -> bytes:
    """page_key of one page already packed (`pack(tokens)[i * 4 * page_size:(i + 1) * 4 * page_size]`)."""
    return _blake2b(parent + page).digest()[:DIGEST_BYTES]


def chain(parent: bytes, tokens: Sequence[int], page_size: int, pages: int) -> list[bytes]:
    """The keys of the first `pages` full pages of `tokens` after `parent` (the same keys as
    page_key one page at a time, with the tokens packed once)."""
    return chain_packed(parent, pack(tokens[:pages * page_size]).tobytes(), 4 * page_size)


def chain_packed(parent: bytes, raw: bytes, step: int, _blake2b=hashlib.blake2b) -> list[bytes]:
    """The keys of the consecutive `step`-byte pages of `raw` (packed as `pack` does) after `parent`:
    packed_key's hash in one loop without a call or a memoryview slice a page (a fifth less time in
    CPython; the gateway chains every page of a long cached prompt, the workers every computed page)."""
    keys: list[bytes] = []
    append = keys.append
    for i in range(0, len(raw) - step + 1, step):
        parent = _blake2b(parent + raw[i:i + step]).digest()[:DIGEST_BYTES]
        append(parent)
    return keys
