"""Layer-group streaming of the prefill engine (worker.py) through the loopback transport.

With --disagg-layer-group-size g the KV of a chunk leaves in groups of g layers, in layer order,
each as soon as its last layer is computed (before the next layer runs). Without speculation the
last group of a prompt's final chunk waits for the sampled first token and carries the aux record;
with speculation every chunk also sends the MTP layer's KV after the draft forward, and the final
chunk's MTP group carries the aux record with the draft state. The decode side must receive
exactly the KV the prefill computed, and chunked prefill must compute what one forward does.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.prefill_worker.rig import Rig, prompt


@pytest.fixture
def make_rig(tiny_model_dir: Path):
    rigs: list[Rig] = []

    def make(**kw) -> Rig:
        rigs.append(Rig(tiny_model_dir, **kw))
        return rigs[-1]

    yield make
    for r in rigs:
        r.close()


def plain_trace(tid: int, n: int, chunk: int, num_layers: int, g: int) -> list[tuple]:
    """The stream one request must produce without speculation: per chunk, each layer group right
    after its last layer; the final chunk's last group after sampling, as the last message with aux."""
    out: list[tuple] = []
    seq = 0
    for start in range(0, n, chunk):
        end, lo = min(start + chunk, n), 0
        final = end == n
        for i in range(num_layers):
            out.append(("layer", i))
            closes_group = (i + 1) % g == 0 or i + 1 == num_layers
            if closes_group and not (final and i + 1 == num_layers):
                out.append(("send", tid, seq, (lo, i + 1), (start, end), False, False))
                seq, lo = seq + 1, i + 1
        if final:
            out += [("sample", 1), ("send", tid, seq, (lo, num_layers), (start, end), True, True)]
    return out


def check_delivery(rig: Rig, tid: int, n: int, topk: int = 0) -> None:
    """Decode got exactly the KV the prefill computed, which matches one unchunked forward; the
    aux record carries the reference first token (and draft state)."""
    job = rig.jobs[tid]
    assert rig.done[tid] is None
    received = rig.decode.kv(tid, n)
    assert torch.equal(received, rig.computed[tid])
    first, kv, draft = rig.reference(job.prompt_ids, topk)
    torch.testing.assert_close(received, kv, atol=1e-5, rtol=1e-4)
    aux = rig.decode.aux[tid]
    assert (aux.transfer_id, aux.prompt_len, aux.first_token) == (tid, n, first) and job.first_token == first
    if topk:
        p, idx, hidden = draft
        assert aux.topk_idx.tolist() == idx.tolist()
        torch.testing.assert_close(aux.topk_p, p, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(aux.hidden, hidden, atol=1e-5, rtol=1e-4)
    else:
        assert not aux.has_draft and aux.hidden.numel() == 0
    assert job.kv_bytes == sum(s.kv.numel() * s.kv.element_size() for s in rig.sent(tid))


def test_groups_leave_in_layer_order_as_their_layers_finish(make_rig) -> None:
    rig = make_rig(group=2)
    tid = rig.submit(rig.job("a", prompt(0, 10))).transfer_id
    rig.run()
    assert rig.trace() == [
        ("layer", 0), ("layer", 1), ("send", tid, 0, (0, 2), (0, 10), False, False),
        ("layer", 2), ("sample", 1), ("send", tid, 1, (2, 3), (0, 10), True, True),
    ]
    check_delivery(rig, tid, 10)
    assert rig.runner.allocator.num_free == rig.free_at_start


@pytest.mark.parametrize(("g", "chunk"), [(1, 4), (2, 7), (3, 64), (8, 7)],
                         ids=["g1-chunk4", "g2-chunk7", "g3-one_chunk", "g8-chunk7"])
def test_stream_per_group_size_and_chunk_budget(make_rig, g: int, chunk: int) -> None:
    rig = make_rig(group=g, chunk_tokens=chunk)
    n = 18
    tid = rig.submit(rig.job("a", prompt(1, n))).transfer_id
    rig.run()
    assert rig.trace() == plain_trace(tid, n, chunk, rig.num_layers, g)
    check_delivery(rig, tid, n)
    assert rig.runner.allocator.num_free == rig.free_at_start


def test_chunked_prefill_streams_each_chunk_then_samples_once(make_rig) -> None:
    rig = make_rig(group=2, chunk_tokens=4)
    tid = rig.submit(rig.job("a", prompt(2, 10))).transfer_id
    rig.turn()
    assert rig.trace() == [("layer", 0), ("layer", 1), ("send", tid, 0, (0, 2), (0, 4), False, False),
                           ("layer", 2), ("send", tid, 1, (2, 3), (0, 4), False, False)]
    assert rig.jobs[tid].first_token is None and tid not in rig.decode.aux
    rig.run()
    assert [e for e in rig.trace()[5:] if e[0] == "send"] == [
        ("send", tid, 2, (0, 2), (4, 8), False, False), ("send", tid, 3, (2, 3), (4, 8), False, False),
        ("send", tid, 4, (0, 2), (8, 10), False, False), ("send", tid, 5, (2, 3), (8, 10), True, True),
    ]
    assert rig.trace().count(("sample", 1)) == 1
    check_delivery(rig, tid, 10)


def test_requests_sharing_a_step_interleave_per_group(make_rig) -> None:
    rig = make_rig(group=2, chunk_tokens=8)
    a = rig.submit(rig.job("a", prompt(3, 5))).transfer_id
    b = rig.submit(rig.job("b", prompt(4, 7))).transfer_id
    rig.run()
    assert rig.trace() == [
        # step 1: all of a (final) and 3 tokens of b share the budget of 8
        ("layer", 0), ("layer", 1),
        ("send", a, 0, (0, 2), (0, 5), False, False), ("send", b, 0, (0, 2), (0, 3), False, False),
        ("layer", 2), ("send", b, 1, (2, 3), (0, 3), False, False),
        ("sample", 1), ("send", a, 1, (2, 3), (0, 5), True, True),
        # step 2: the rest of b
        ("layer", 0), ("layer", 1), ("send", b, 2, (0, 2), (3, 7), False, False),
        ("layer", 2), ("sample", 1), ("send", b, 3, (2, 3), (3, 7), True, True),
    ]
    check_delivery(rig, a, 5)
    check_delivery(rig, b, 7)
    assert rig.runner.allocator.num_free == rig.free_at_start


def test_two_final_chunks_in_one_step_sample_together(make_rig) -> None:
    rig = make_rig(group=2, chunk_tokens=32)
    a = rig.submit(rig.job("a", prompt(5, 6))).transfer_id
    b = rig.submit(rig.job("b", prompt(6, 9))).transfer_id
    rig.run()
    assert rig.trace() == [
        ("layer", 0), ("layer", 1),
        ("send", a, 0, (0, 2), (0, 6), False, False), ("send", b, 0, (0, 2), (0, 9), False, False),
        ("layer", 2), ("sample", 2),
        ("send", a, 1, (2, 3), (0, 6), True, True), ("send", b, 1, (2, 3), (0, 9), True, True),
    ]
    check_delivery(rig, a, 6)
    check_delivery(rig, b, 9)


def test_speculative_prefill_sends_the_mtp_layer_last_with_the_draft_state(make_rig) -> None:
    rig = make_rig(group=2, chunk_tokens=6, spec_topk=2)
    tid = rig.submit(rig.job("a", prompt(7, 10))).transfer_id
    rig.run()
    assert rig.trace() == [
        # chunk [0, 6): every target group streams at once, then the MTP layer's KV (no aux)
        ("layer", 0), ("layer", 1), ("send", tid, 0, (0, 2), (0, 6), False, False),
        ("layer", 2), ("send", tid, 1, (2, 3), (0, 6), False, False),
        ("mtp",), ("send", tid, 2, (3, 4), (0, 6), False, False),
        # final chunk [6, 10): the last target group does not wait; the MTP group carries the aux
        ("layer", 0), ("layer", 1), ("send", tid, 3, (0, 2), (6, 10), False, False),
        ("layer", 2), ("send", tid, 4, (2, 3), (6, 10), False, False),
        ("sample", 1), ("mtp",), ("send", tid, 5, (3, 4), (6, 10), True, True),
    ]
    aux = rig.decode.aux[tid]
    assert aux.has_draft and aux.topk_idx.shape == (2,)
    assert aux.hidden.shape == (rig.runner.config.hidden_size,)
    check_delivery(rig, tid, 10, topk=2)
    assert rig.runner.allocator.num_free == rig.free_at_start


def covered(sent: list, layer: int) -> list[int]:
    """The token positions of one layer that the decode side received, in order of sending."""
    return [t for s in sent if s.layers[0] <= layer < s.layers[1] for t in range(*s.tokens)]


def test_tokens_the_decode_side_holds_are_never_sent_for_any_layer(make_rig) -> None:
    from common.kvcache.prefix_index import PrefixCache

    rig = make_rig(group=2, chunk_tokens=6, spec_topk=2)
    rig.sched.cache = PrefixCache(rig.runner.allocator, 4, check_successor=True)  # the prefill side's own cache
    ids = prompt(7, 14)
    job = rig.job("a", ids)
    job.decode_cached = 8  # AwaitReserved said: the decode worker holds pages 0 and 1
    tid = rig.submit(job).transfer_id
    rig.run()
    layers = rig.runner.kv_pool.num_layers  # the MTP layer included
    sent = rig.sent(tid)
    assert all(s.tokens[0] >= 8 for s in sent), [s.tokens for s in sent]
    assert all(covered(sent, layer) == list(range(8, 14)) for layer in range(layers))
    assert [s.is_last for s in sent].count(True) == 1 and sent[-1].is_last
    first, kv, _ = rig.reference(ids, 2)
    assert rig.decode.aux[tid].first_token == first and job.cached_len == 0
    torch.testing.assert_close(rig.decode.kv(tid, 14)[:, :, 8:], kv[:, :, 8:], atol=1e-5, rtol=1e-4)
    assert job.kv_bytes == sum(s.kv.numel() * s.kv.element_size() for s in sent)

    # the prefill side hits 3 pages of its own, the decode side 1: the early send starts at the decode's
    again = rig.job("b", ids[:12] + [5, 6, 7])
    again.decode_cached = 4
    tid = rig.submit(again).transfer_id
    rig.run()
    assert again.cached_len == 8  # the MTP rule gave up the third page: its successor differs
    sent = rig.sent(tid)
    assert all(covered(sent, layer) == list(range(4, 15)) for layer in range(layers))
    _, kv, _ = rig.reference(again.prompt_ids, 2)
    torch.testing.assert_close(rig.decode.kv(tid, 15)[:, :, 4:], kv[:, :, 4:], atol=1e-5, rtol=1e-4)
    assert rig.runner.allocator.num_used == rig.sched.cache.num_cached  # only idle cached pages left
