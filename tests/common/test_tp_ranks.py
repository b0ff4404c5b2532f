"""The leader/follower process structure of a TP worker on the CPU: plans round-trip through their
encoding; a leader in this process with a spawned follower runs every forward kind (eager, graphable
with a hidden input sent or reused, KV slot copies) and gets one device's logits; `glmserve generate
--tp-size 2` prints one device's tokens; a follower killed mid-run breaks the group with a reason
naming the rank within seconds, and the leader's next forward fails instead of hanging; a killed
leader's followers exit on their own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from common.forward.batch import ForwardBatch, SeqSpec
from common.runtime.cuda_graphs import Forward
from common.runtime.distributed import TPConfig
from common.runtime.runner import ModelRunner, RunnerSpec
from common.runtime.step_plan import (
    BatchMeta,
    CapturePlan,
    CopySlotsPlan,
    ForwardPlan,
    HiddenInput,
    Mirror,
    PlanKind,
    ReleasePlan,
    StopPlan,
    TPBroken,
    decode,
    encode,
)
from common.worker.ranks import start_ranks
from tests.common.test_tp_model import _workload

PAGE = 4


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _tree_batch() -> ForwardBatch:
    mask = torch.tensor([[[1, 0, 0], [1, 1, 0], [1, 0, 1]]], dtype=torch.bool).repeat(2, 1, 1)
    return ForwardBatch.tree(torch.tensor([[5, 6, 7], [8, 9, 10]]), torch.tensor([[0, 1, 1], [0, 1, 2]]), mask,
                             [9, 2], [[3, 4, 5], [6, 7]], PAGE)


def test_plans_round_trip() -> None:
    for batch in (ForwardBatch.decode([1, 2, 3], [5, 0, 9], [[3, 4], [5], [6, 7, 8]], PAGE), _tree_batch(),
                  ForwardBatch.build([SeqSpec([4, 5, 6], range(3), 3, [2], logit_rows=[0, 2])], PAGE)):
        plan = ForwardPlan(PlanKind.RUN, BatchMeta.of(batch), HiddenInput.SENT, forward=2, topk=3)
        data = encode(plan)
        assert decode(data) == plan and len(data) == 2 + 32 + 24 * batch.num_seqs
        back = plan.meta.unpack(BatchMeta.pack(batch))
        for field in ("input_ids", "positions", "query_start", "prefix_lens", "seq_lens", "page_table", "out_slots",
                      "logit_rows", "mask", "mask_start"):
            a, b = getattr(back, field), getattr(batch, field)
            assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b)), field
        assert (back.query_lens_host, back.prefix_lens_host, back.seq_lens_host) == (
            batch.query_lens_host, batch.prefix_lens_host, batch.seq_lens_host)
    for plan in (CopySlotsPlan(7), CapturePlan(True, 64, 3, 2, 6), CapturePlan(False, 8), ReleasePlan(), StopPlan()):
        assert decode(encode(plan)) == plan


def _mirrored_workload(runner: ModelRunner) -> dict[str, torch.Tensor]:
    """_workload, then the graphable forwards (run eagerly on the CPU) and a KV slot copy."""
    out = _workload(runner)
    pages = runner.allocator.alloc(6)
    prefill = ForwardBatch.build([SeqSpec(list(range(20, 33)), range(13), 13, pages)], PAGE)
    _, hidden = runner.forward(prefill)
    out["run.decode"] = runner.decode_logits(ForwardBatch.decode([40], [13], [pages], PAGE))
    tree = ForwardBatch.tree(torch.tensor([[41, 42, 43]]), torch.tensor([[0, 1, 1]]),
                             torch.tensor([[[1, 0, 0], [1, 1, 0], [1, 0, 1]]], dtype=torch.bool), [14], [pages], PAGE)
    out["run.verify.logits"], out["run.verify.hidden"] = runner.verify_forward(tree)
    runner.copy_kv_slots(torch.tensor([pages[3] * PAGE + 2 + 2]), torch.tensor([pages[3] * PAGE + 2 + 1]))
    step = ForwardBatch.tree(torch.tensor([[44]]), torch.tensor([[1]]), torch.ones(1, 1, 2, dtype=torch.bool), [15],
                             [pages], PAGE)
    out["run.step.logits"], _ = runner.draft_step_forward(step, out["run.verify.hidden"][:1].clone())
    extend = ForwardBatch.tree(torch.tensor([[41, 42]]), torch.tensor([[0, 1]]),
                               torch.ones(1, 2, 2, dtype=torch.bool).tril(), [14], [pages], PAGE)
    p, idx, _ = runner.draft_extend_forward(extend, hidden[-2:].clone(), 2)
    out["run.extend.p"], out["run.extend.idx"] = p, idx.float()
    out["after.decode"] = runner.decode_logits(ForwardBatch.decode([45], [16], [pages], PAGE))
    return out


def test_a_broadcast_that_fails_breaks_the_group() -> None:
    """A follower that dies while the leader broadcasts a plan's tensors: the collective's error
    becomes TPBroken with the group's reason (the watcher's report of the death, when it has one),
    so the step's requests fail UNAVAILABLE (retry elsewhere), not INTERNAL."""

    class Pipe:
        def __init__(self) -> None:
            self.sent: list[bytes] = []

        def send_bytes(self, data: bytes) -> None:
            self.sent.append(data)

    class DeadPeer:
        def broadcast(self, t: torch.Tensor) -> None:
            raise RuntimeError("Connection reset by peer")

    reasons: list[str] = []

    def on_fail(reason: str) -> str:
        reasons.append(reason)
        return "TP rank 1 (pid 123) exited with code -9"

    pipe = Pipe()
    mirror = Mirror(DeadPeer(), [pipe], on_fail)
    with pytest.raises(TPBroken, match=r"TP rank 1 \(pid 123\) exited with code -9"):
        mirror.publish(StopPlan(), [torch.zeros(2)])
    assert len(pipe.sent) == 1 and len(reasons) == 1 and "Connection reset by peer" in reasons[0]


def test_leader_with_a_follower_runs_every_forward_like_one_device(tiny_model_dir: Path, restore_threads) -> None:
    spec = RunnerSpec(str(tiny_model_dir), "float32", PAGE, 64, with_mtp=True)
    want = _mirrored_workload(spec.build("cpu"))
    runner, ranks = start_ranks(spec, TPConfig.resolve(2, "cpu"), role="test")
    try:
        got = _mirrored_workload(runner)
        assert ranks.failure is None
    finally:
        ranks.stop()
    for key, w in want.items():
        assert float((got[key] - w).abs().max() / w.abs().max()) <= 1e-5, key
    assert runner.kv_pool.kv_heads == 1 and runner.tp.size == 2


def test_generate_cli_with_tp_prints_one_device_tokens(tiny_model_dir: Path) -> None:
    def run(*extra: str) -> str:
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
        proc = subprocess.run([sys.executable, "-m", "common.tools.cli", "generate", "--model-path",
                               str(tiny_model_dir), "--max-tokens", "8", *extra],
                              capture_output=True, text=True, timeout=120, env=env, check=False)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stderr.strip().splitlines()[-1]  # "[n prompt tokens, 8 generated: [...]]"

    assert run("--tp-size", "2") == run()


def test_a_killed_follower_breaks_the_group_within_seconds(tiny_model_dir: Path, restore_threads) -> None:
    runner, ranks = start_ranks(RunnerSpec(str(tiny_model_dir), "float32", PAGE, 32), TPConfig.resolve(2, "cpu"),
                                role="test")
    seen: list[tuple[float, str]] = []
    ranks.on_failure(lambda reason: seen.append((time.monotonic(), reason)))
    pages = runner.allocator.alloc(2)
    runner.forward(ForwardBatch.build([SeqSpec([1, 2, 3], range(3), 3, pages)], PAGE))
    victim = ranks.procs[0]
    t0 = time.monotonic()
    os.kill(victim.pid, signal.SIGKILL)
    while not seen and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    try:
        assert seen, "no failure reported"
        when, reason = seen[0]
        assert when - t0 < 3.0
        assert reason == f"TP rank 1 (pid {victim.pid}) exited with code -9"
        with pytest.raises((TPBroken, RuntimeError)):
            runner.forward(ForwardBatch.build([SeqSpec([4], range(3, 4), 4, pages)], PAGE))
        assert time.monotonic() - t0 < 10
    finally:
        ranks.stop()
    assert ranks.failure == reason


def test_tp_layouts_that_cannot_run_are_refused() -> None:
    with pytest.raises(ValueError, match=r"--tp-size 3: choose one of \(1, 2, 4, 8\)"):
        TPConfig.resolve(3, "cpu")
    with pytest.raises(ValueError, match="--tp-backend nccl needs CUDA devices"):
        TPConfig.resolve(2, "cpu", "nccl")
    assert TPConfig.resolve(4, "cpu") == TPConfig(4, ("cpu",) * 4, "gloo", 60.0)
    assert list(Forward)[2] is Forward.DRAFT_STEP  # RUN plans name forwards by position


LEADER = """
import sys, time
from common.runtime.distributed import TPConfig
from common.runtime.runner import RunnerSpec
from common.worker.ranks import start_ranks
if __name__ == "__main__":
    runner, ranks = start_ranks(RunnerSpec(sys.argv[1], "float32", 4, 16), TPConfig.resolve(2, "cpu"))
    print(ranks.procs[0].pid, flush=True)
    time.sleep(60)
"""


def test_followers_exit_when_their_leader_is_killed(tiny_model_dir: Path, tmp_path: Path) -> None:
    script = tmp_path / "leader.py"
    script.write_text(LEADER)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    leader = subprocess.Popen([sys.executable, str(script), str(tiny_model_dir)], stdout=subprocess.PIPE, text=True,
                              env=env)
    try:
        follower = int(leader.stdout.readline())
        leader.kill()
        leader.wait(10)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 10 and Path(f"/proc/{follower}").exists() and _state(follower) != "Z":
            time.sleep(0.05)
        assert not Path(f"/proc/{follower}").exists() or _state(follower) == "Z"
        assert time.monotonic() - t0 < 3.0
    finally:
        leader.kill()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"
