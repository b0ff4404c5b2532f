"""Prometheus metrics of every glmserve process, defined in this one place.

Metrics are created on first use through get-or-create on the default registry, so several roles
in one process (tests) share them instead of failing with "Duplicated timeseries".

    from common.serving import metrics
    metrics.requests_total().labels(status="OK").inc()
    metrics.start_metrics_server(9100, "127.0.0.1")
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server

M = TypeVar("M", Counter, Gauge, Histogram)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
_ACCEPT_BUCKETS = (1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0)

_lock = threading.Lock()
_created: dict[str, object] = {}


def _get_or_create(cls: Callable[..., M], name: str, doc: str, labels: Sequence[str] = (),
                   registry: CollectorRegistry = REGISTRY, **kwargs: object) -> M:
    with _lock:
        key = f"{id(registry)}:{name}"
        found = _created.get(key)
        if found is None:
            # Someone else may have registered it on this registry without us (another import path).
            existing = getattr(registry, "_names_to_collectors", {}).get(name)
            found = existing if existing is not None else cls(name, doc, labelnames=tuple(labels),
                                                               registry=registry, **kwargs)
            _created[key] = found
        return found  # type: ignore[return-value]


def requests_total() -> Counter:
    """Finished requests by final gRPC status name ("OK", "INVALID_ARGUMENT", ...)."""
    return _get_or_create(Counter, "glmserve_requests_total", "Finished requests by status", ["status"])


def ttft_seconds() -> Histogram:
    return _get_or_create(Histogram, "glmserve_ttft_seconds", "Time to first token",
                          buckets=_LATENCY_BUCKETS)


def inter_token_latency_seconds() -> Histogram:
    return _get_or_create(Histogram, "glmserve_inter_token_latency_seconds",
                          "Time between streamed token chunks divided by the tokens they carry",
                          buckets=_ITL_BUCKETS)


def queue_depth() -> Gauge:
    """Requests waiting, by queue name (e.g. "prefill", "decode_waiting_for_kv", "gateway_inflight")."""
    return _get_or_create(Gauge, "glmserve_queue_depth", "Requests in a queue", ["queue"])


def kv_pages() -> Gauge:
    return _get_or_create(Gauge, "glmserve_kv_pages", "KV cache pages by state", ["state"])


def kv_transfer_bytes_total() -> Counter:
    return _get_or_create(Counter, "glmserve_kv_transfer_bytes_total", "KV bytes moved prefill -> decode")


def kv_transfer_seconds() -> Histogram:
    return _get_or_create(Histogram, "glmserve_kv_transfer_seconds", "KV transfer latency per request",
                          buckets=_LATENCY_BUCKETS)


def errors_total() -> Counter:
    """Errors by gRPC status name."""
    return _get_or_create(Counter, "glmserve_errors_total", "Errors by gRPC status code", ["code"])


def http_slow_client_aborts_total() -> Counter:
    """HTTP streams cut off because the client stopped reading (--max-pending-stream-bytes)."""
    return _get_or_create(Counter, "glmserve_http_slow_client_aborts_total",
                          "HTTP streams aborted because the client stopped reading")


def grammar_requests_total() -> Counter:
    """Gateway: constrained requests by outcome: applied (the workers reported tokens sampled under the
    grammar), not_reached (the reasoning took every token), unverified (answer tokens not counted),
    dropped (an answer came back unconstrained: the request failed with INTERNAL)."""
    return _get_or_create(Counter, "glmserve_grammar_requests_total", "Constrained requests by outcome",
                          ["outcome"])


def spec_accept_length() -> Histogram:
    return _get_or_create(Histogram, "glmserve_spec_accept_length",
                          "Tokens produced per speculative verify step (per request)",
                          buckets=_ACCEPT_BUCKETS)


def grammar_compile_seconds() -> Histogram:
    """Structured-output compiles (cache misses) by grammar kind and outcome ("ok", "error")."""
    return _get_or_create(Histogram, "glmserve_grammar_compile_seconds", "Grammar compile time (cache misses)",
                          ["kind", "outcome"], buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))


def prefix_cache_query_tokens_total() -> Counter:
    """Prompt tokens admitted by a prefill worker (the denominator of the token hit rate)."""
    return _get_or_create(Counter, "glmserve_prefix_cache_query_tokens_total", "Prompt tokens looked up in the prefix cache")


def prefix_cache_hit_tokens_total() -> Counter:
    return _get_or_create(Counter, "glmserve_prefix_cache_hit_tokens_total",
                          "Prompt tokens whose KV came from the prefix cache")


def prefix_cache_hit_requests_total() -> Counter:
    return _get_or_create(Counter, "glmserve_prefix_cache_hit_requests_total",
                          "Requests that reused at least one cached page")


def prefix_cache_evictions_total() -> Counter:
    return _get_or_create(Counter, "glmserve_prefix_cache_evictions_total", "Cached pages evicted for new allocations")


def prefix_cache_mtp_drops_total() -> Counter:
    """Matched pages given up because the MTP draft KV of their last slot saw another next token."""
    return _get_or_create(Counter, "glmserve_prefix_cache_mtp_drops_total",
                          "Matched prefix pages dropped by the MTP successor rule")


def prefix_cache_pages() -> Gauge:
    """Prefix-cache pages by state: free, cached (idle, evictable), active (held by a request)."""
    return _get_or_create(Gauge, "glmserve_prefix_cache_pages", "Prefix-cache pages by state", ["state"])


def prefix_cache_indexed_pages() -> Gauge:
    return _get_or_create(Gauge, "glmserve_prefix_cache_indexed_pages", "Pages findable in the prefix index")


def router_decisions_total() -> Counter:
    """Gateway routing choices by role and reason: cache (a worker's events say it holds >= 1 page of
    the prompt), approx (the gateway routed that prefix there recently), load (no worker holds any),
    local (the decode worker computes the short uncached suffix itself)."""
    return _get_or_create(Counter, "glmserve_router_decisions_total", "Routing decisions by role and reason",
                          ["role", "reason"])


def router_index_pages() -> Gauge:
    return _get_or_create(Gauge, "glmserve_router_index_pages",
                          "Pages in the gateway's routing index: exact (from worker events) or approx (routed)",
                          ["kind"])


def router_cache_events_total() -> Counter:
    return _get_or_create(Counter, "glmserve_router_cache_events_total", "Cache events received from workers")


_DECODE_CACHE_COUNTERS = {
    "query_tokens": "Prompt tokens a decode worker looked up in its prefix cache at reservation",
    "hit_tokens": "Prompt tokens a decode worker held already (not transferred, not computed)",
    "evictions": "Decode-side cached pages evicted for new allocations",
    "mtp_drops": "Decode-side matched pages dropped by the MTP successor rule",
    "local_prefills": "Requests whose uncached prompt suffix the decode worker computed itself",
}


def decode_prefix_cache_total(what: str) -> Counter:
    """The decode worker's prefix-cache counters (glmserve_decode_prefix_cache_<what>_total)."""
    return _get_or_create(Counter, f"glmserve_decode_prefix_cache_{what}_total", _DECODE_CACHE_COUNTERS[what])


def decode_prefix_cache_pages() -> Gauge:
    """Decode-side pages by state: free, cached (idle, evictable), active (held by a request), indexed."""
    return _get_or_create(Gauge, "glmserve_decode_prefix_cache_pages", "Decode-side prefix-cache pages by state",
                          ["state"])


def report_decode_prefix_cache(cache, reported: dict[str, int], **totals: int) -> None:
    """Set the decode prefix-cache gauges from `cache` (a PrefixCache) and add the growth of each
    running total (`totals` and the cache's evictions / mtp_drops) since the last call, kept in `reported`."""
    totals = {**totals, "evictions": cache.evictions, "mtp_drops": cache.mtp_drops}
    for what, total in totals.items():
        grown = total - reported.get(what, 0)
        if grown:
            decode_prefix_cache_total(what).inc(grown)
            reported[what] = total
    pages = decode_prefix_cache_pages()
    pages.labels(state="free").set(cache.allocator.num_free)
    pages.labels(state="cached").set(cache.num_cached)
    pages.labels(state="active").set(cache.num_active)
    pages.labels(state="indexed").set(cache.num_indexed)


def start_metrics_server(port: int | None, addr: str) -> int | None:
    """Serve /metrics over HTTP on addr:`port` (the process's --host; None = off; 0 = any free
    port). Returns the port."""
    if port is None:
        return None
    server, _thread = start_http_server(port, addr=addr)
    return int(server.server_port)
