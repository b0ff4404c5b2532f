"""Two-GPU disaggregated serving run: prefill worker on device A, decode worker on device B, NCCL KV.

    OUT=/some/dir bash benchmarks/run_multi_gpu.sh                      # GPU 0 -> GPU 1 (< 9 minutes)
    python3 -m benchmarks.serving.run_multi_gpu --stages tp                       # 4+ GPUs (benchmarks/run_multi_gpu_tp.sh)
    python3 -m benchmarks.serving.run_multi_gpu --devices cpu,cpu,cpu,cpu --stages tp --out /tmp/tp  # on CPU
    python3 -m benchmarks.serving.run_multi_gpu --devices cpu,cpu --out /tmp/mg  # same flow on CPU (gloo)

Every cluster is gateway + prefill + decode as separate `python -m common.tools.cli` processes
(common.tools.launch.start_cluster). "Two-device" clusters put the prefill worker on the first device
and the decode worker(s) on the second with `--kv-backend nccl` (gloo on CPU). "Reference"
clusters put both workers on the first device with `--kv-backend cuda_ipc` (gloo on CPU): the
single-GPU run every two-device output is compared with. GPU runs use --dtype bfloat16 on both
sides; every request is greedy (temperature 0, ignore_eos) and sent one at a time in the same
order to both clusters, so batching is identical and the outputs must agree token for token.

Stages (each under its own time limit; a stage that fails or times out is recorded as FAIL and
the run goes on; results are rewritten to $OUT after every check):

1. tiny: the tiny model (make_tiny_model, context 65536 so long streams can be cancelled/killed),
   plain greedy, EAGLE 3,1,4 with the random MTP layer, and EAGLE 3,1,4 with a draft that always
   agrees (common.tools.agreeing_draft: accept length near 4 exercises the accept path across
   devices). Checks: tokens equal, usage.spec_verify_steps / spec_accept_length equal;
   cancellation (client cancel after the first token and a 0.5 s deadline: GetLoad free pages of
   both workers back to their initial counts, the cluster still serves); a killed decode worker
   (1 prefill + 2 decode workers on the second device; SIGKILL the one serving most streams: its
   clients get UNAVAILABLE within 10 s, streams on the other worker keep receiving tokens, new
   requests are served and equal the reference cluster's output).
2. bandwidth (GPU only): benchmarks.serving.bench_transport.run_kv_bandwidth over NCCL between the
   two GPUs, GLM-4.5-Air-shaped KV (47 layers x 2 x T x 8 x 128 bf16) for T = 1K, 8K, 32K tokens,
   every byte checked, next to the raw GPU-to-GPU copy bandwidth it measures (torch copy_ between
   devices).
3. air (GPU only): a 4-layer model with GLM-4.5-Air widths (benchmarks.serving.bench_e2e.AIR_LAYERS,
   random bf16 weights, written once to --work-dir), plain and EAGLE 3,1,4: tokens and spec
   statistics equal the reference cluster (prompts up to 9000 tokens, i.e. two prefill chunks);
   cancellation (after the first token, mid-prefill of an 8K prompt, deadline).
4. concurrency (GPU only): TTFT (client side, p50/max) and inter-token latency (p50 of each
   request's (t_last - t_first)/(n - 1)) at 1, 8 and 32 concurrent requests, 1024-token prompts,
   64 output tokens, plain and EAGLE, Air-layer model on two GPUs; one unmeasured round per level.
5. overlap (GPU only): two two-GPU clusters of the Air-layer model that differ only in
   --disagg-layer-group-size: 1 ("streamed": layers 0..L-2 leave while later layers compute; the
   last layer waits for the first token and goes with it) and 64 >= L ("unstreamed": all KV leaves
   after the forward). Both use --chunked-prefill-size 32768 so each prompt is ONE forward.
   For prompts of 1K, 8K and 32K tokens, requests alternate between the two clusters (max_tokens 2,
   one unmeasured request per size and cluster first; 8, 8 and 4 repetitions) and we record client TTFT and the decode
   worker's glmserve_kv_transfer_seconds / _bytes_total deltas per request.
   - End-to-end KV bandwidth (decode-side metric) = bytes / seconds, where seconds is first chunk
     started -> last chunk done on the decode worker. In the unstreamed cluster a prompt's KV is a
     single message, so this is the pure transfer rate; in the streamed cluster it also contains
     the compute of layers 1..L-1 (printed for reference, not a bandwidth).
   - Hidden share = (TTFT_unstreamed - TTFT_streamed) / T_xfer, with T_xfer the unstreamed
     cluster's decode-side transfer time (medians over the repetitions): the part of the transfer
     that layer-group streaming removed from the critical path. With L = 4 layers and the last
     layer held for the first token, at most (L-1)/L = 75% can be hidden; the 46-layer model with
     group 4 could hide up to ~11/12. When T_xfer is small next to the TTFT spread (NVLink moves an
     8K-token 4-layer KV in about a millisecond), the share is reported with the spread and marked
     as within noise rather than as a number to trust.

6. tp (>= 4 GPUs, or four `cpu` entries in --devices): clusters of one prefill worker of TP p and one
   decode worker of TP d (`glmserve local --prefill-tp-size p --decode-tp-size d`), (p, d) = (2, 2)
   and (4, 2): prefill ranks from GPU 0, decode ranks on the GPUs after them (on a 4-GPU host the
   (4, 2) decode ranks share GPUs 2-3: those rank pairs move KV over CUDA IPC, the rest over NCCL).
   The tiny model in float32 (TP changes the order of the all-reduce sums; fp32 keeps that far
   below the logit gaps), plain and EAGLE 3,1,4: tokens and spec statistics equal the single-device
   reference cluster's.
7. glm45 (8 GPUs, or eight `cpu` entries with --exercise-all): GLM-4.5 FP8 from a config-only
   directory with --load-format dummy, prefill TP 4 on GPUs 0-3 + decode TP 4 on GPUs 4-7, TTFT /
   ITL / output tok/s at 1, 16 and 64 concurrent streams (1024-token prompts, 64 tokens), plain and
   EAGLE 3,1,4, one cluster at a time. The full 92 layers need 91 GB a rank: on an H100 the stage
   serves the deepest model that fits (glm45_layers_that_fit) and says so.
--stages picks stages (default: tiny, bandwidth, air on GPUs; tp and glm45 when the host has the GPUs).

Environment: NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1 are
set here (for this process and the bench's spawned processes) and by common.tools.launch for every
worker. Outputs under --out: MULTI_GPU.md (summary, PASS/FAIL per check), results.json,
workers.log (log tails of every process of every cluster).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NCCL_SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
os.environ.update(NCCL_SAFE_ENV)

REPO = Path(__file__).resolve().parents[2]  # the checkout: git facts, and the cwd of helper processes

import grpc

from common.tools.launch import Cluster, free_port, start_cluster
from protos import gateway_pb2, gateway_pb2_grpc, worker_pb2, worker_pb2_grpc

EAGLE = ["--speculative-algorithm", "EAGLE", "--speculative-num-steps", "3", "--speculative-eagle-topk", "1",
         "--speculative-num-draft-tokens", "4"]
T0 = time.monotonic()


# ---------------------------------------------------------------------------------------------- report
class Report:
    """Checks, tables and raw results; MULTI_GPU.md and results.json are rewritten after every change."""

    def __init__(self, out: Path, header: list[str]) -> None:
        self.out = out
        self.header = header
        self.checks: list[tuple[str, bool, str]] = []
        self.sections: list[tuple[str, list[str]]] = []
        self.stages: list[str] = []
        self.results: dict[str, Any] = {}
        self.lock = threading.Lock()

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        with self.lock:
            self.checks.append((name, bool(ok), detail))
        print(f"{'PASS' if ok else 'FAIL'}: {name}{' -- ' + detail if detail else ''}", flush=True)
        self.write()
        return bool(ok)

    def table(self, title: str, lines: list[str]) -> None:
        with self.lock:
            self.sections.append((title, lines))
        print(f"## {title}\n" + "\n".join(lines), flush=True)
        self.write()

    def stage(self, line: str) -> None:
        with self.lock:
            self.stages.append(line)
        print(line, flush=True)
        self.write()

    def put(self, key: str, value: Any) -> None:
        with self.lock:
            self.results[key] = value
        self.write()

    def write(self) -> None:
        fails = sum(not ok for _, ok, _ in self.checks)
        lines = list(self.header)
        lines += ["", f"**{len(self.checks) - fails} PASS, {fails} FAIL** (elapsed {time.monotonic() - T0:.0f} s)", "",
                  "## Checks", ""]
        lines += [f"- {'PASS' if ok else 'FAIL'}: {n}{' -- ' + d if d else ''}" for n, ok, d in self.checks]
        for title, body in self.sections:
            lines += ["", f"## {title}", "", *body]
        lines += ["", "## Stages", "", *[f"- {s}" for s in self.stages], ""]
        tmp = self.out / ".MULTI_GPU.md.tmp"
        tmp.write_text("\n".join(lines))
        tmp.replace(self.out / "MULTI_GPU.md")
        tmp = self.out / ".results.json.tmp"
        tmp.write_text(json.dumps({"checks": [{"name": n, "ok": ok, "detail": d} for n, ok, d in self.checks],
                                   "results": self.results}, indent=1, default=str))
        tmp.replace(self.out / "results.json")


class StageTimeout(Exception):
    pass


def _alarm(*_: object) -> None:
    raise StageTimeout("stage time limit reached")


@contextmanager
def stage(report: Report, name: str, limit_s: float, deadline: float) -> Iterator[None]:
    """Run a block under min(limit_s, time left before the global deadline); failures become FAIL lines."""
    left = deadline - time.monotonic()
    limit = int(max(1, min(limit_s, left)))
    start = time.monotonic()
    report.stage(f"{name}: start at +{start - T0:.0f} s, limit {limit} s")
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(limit)
    try:
        yield
    except StageTimeout:
        report.check(f"{name}: finished within its limit", False, f"stopped after {limit} s")
    except Exception as e:  # noqa: BLE001 (a stage never stops the run)
        traceback.print_exc()
        report.check(f"{name}: ran without error", False, f"{type(e).__name__}: {str(e)[:300]}")
    finally:
        signal.alarm(0)
        report.stage(f"{name}: done in {time.monotonic() - start:.0f} s")


# ---------------------------------------------------------------------------------------------- clusters
@dataclass
class Handle:
    name: str
    cluster: Cluster
    log_dir: Path
    metrics_port: int | None = None
    _stub: Any = None
    relaunch: Any = None  # () -> Handle with fresh ports (a port picked by free_port can be taken meanwhile)

    @property
    def stub(self) -> gateway_pb2_grpc.GatewayStub:
        if self._stub is None:
            self._stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(self.cluster.gateway_address))
        return self._stub


@dataclass
class Ctx:
    args: argparse.Namespace
    report: Report
    dev_a: str
    dev_b: str
    gpu: bool
    work: Path
    handles: list[Handle] = field(default_factory=list)
    # sizes of the measurement stages (GPU run; --exercise-all on CPU shrinks them to validate the code paths)
    bench_tokens: tuple[int, ...] = (1024, 8192, 32768)
    overlap_sizes: tuple[tuple[int, int], ...] = ((1024, 8), (8192, 8), (32768, 4))
    concurrency: tuple[int, ...] = (1, 8, 32)
    conc_prompt: int = 1024
    air_prompts: tuple[int, ...] = (5, 100, 700, 2500, 9000)
    mid_prefill_len: int = 8000
    ngpu: int = 0  # GPUs on the host (the tp and glm45 stages)
    tp_prompts: tuple[int, ...] = (3, 17, 64, 200, 600, 1500)
    glm45_levels: tuple[int, ...] = (1, 16, 64)

    def launch(self, name: str, model: Path, *, two_device: bool, worker: list[str] = (), prefill_args: list[str] = (),
               decode_args: list[str] = (), decode: int = 1, pages: int, metrics: bool = False) -> Handle:
        if two_device:
            pdev, ddev, backend = self.dev_a, self.dev_b, ("nccl" if self.gpu else "gloo")
        else:
            pdev, ddev, backend = self.dev_a, self.dev_a, ("cuda_ipc" if self.gpu else "gloo")
        mport = free_port() if metrics else None
        log_dir = self.work / "logs" / name
        wargs = ["--kv-backend", backend, "--num-pages", str(pages), "--transfer-timeout", "20",
                 "--shutdown-grace", "5", *(["--dtype", "bfloat16"] if self.gpu else []), *worker]
        cluster = start_cluster(model, prefill=1, decode=decode, extra_worker_args=wargs,
                                extra_prefill_args=["--device", pdev, *prefill_args],
                                extra_decode_args=["--device", ddev, "--max-running-requests", "64",
                                                   *(["--metrics-port", str(mport)] if mport else []), *decode_args],
                                log_dir=log_dir)
        h = Handle(name, cluster, log_dir, mport)
        h.relaunch = lambda: self.launch(name, model, two_device=two_device, worker=worker, prefill_args=prefill_args,
                                         decode_args=decode_args, decode=decode, pages=pages, metrics=metrics)
        self.handles.append(h)
        print(f"started {name}: prefill {pdev}, decode {ddev} x{decode}, kv {backend}, model {model.name}", flush=True)
        return h

    def wait_ready(self, handles: dict[Any, Handle], timeout: float) -> None:
        """Wait for every cluster; one whose process lost its port to another process is started again
        (up to twice) and replaces the old handle in `handles` in place."""
        deadline = time.monotonic() + timeout
        for i, h in list(handles.items()):
            for attempt in range(3):
                try:
                    h.cluster.wait_ready(max(1.0, deadline - time.monotonic()))
                    break
                except Exception as e:
                    bind = any("Failed to bind" in f.read_text(errors="replace") or "Address already in use" in
                               f.read_text(errors="replace") for f in h.log_dir.glob("*.log"))
                    if not bind or attempt == 2:
                        raise RuntimeError(f"{h.name} not ready: {e}") from e
                    print(f"{h.name}: a port was taken by another process; starting it again", flush=True)
                    self.stop([h])
                    h2 = h.relaunch()
                    handles[i] = h2
                    h = h2
        print(f"ready: {', '.join(h.name for h in handles.values())} at +{time.monotonic() - T0:.0f} s", flush=True)

    def stop(self, handles: list[Handle], timeout: float = 12.0) -> None:
        """SIGTERM every process of every handle at once, SIGKILL what is left after `timeout`."""
        procs = [p for h in handles for p in h.cluster.procs.values()]
        for p in procs:
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGTERM)
                except OSError:
                    pass
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for h in handles:
            self.dump_logs(h)
            if h in self.handles:
                self.handles.remove(h)

    def dump_logs(self, h: Handle) -> None:
        with open(self.report.out / "workers.log", "a") as out:
            for f in sorted(h.log_dir.glob("*.log")):
                text = f.read_text(errors="replace")
                out.write(f"===== {h.name}/{f.name} ({len(text)} chars, tail)\n{text[-5000:]}\n")


# ---------------------------------------------------------------------------------------------- requests
@dataclass
class Gen:
    tokens: list[int]
    ttft: float
    stamps: list[float]
    finish: str
    verify_steps: int
    accept_length: float


def prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 800) for _ in range(n)]


def request(ids: list[int], max_tokens: int) -> gateway_pb2.GenerateRequest:
    req = gateway_pb2.GenerateRequest(tokens=gateway_pb2.TokenIds(ids=ids))
    req.sampling.max_tokens, req.sampling.temperature, req.sampling.ignore_eos = max_tokens, 0.0, True
    return req


def generate(stub: Any, ids: list[int], max_tokens: int, timeout: float = 120.0) -> Gen:
    t0 = time.perf_counter()
    out = Gen([], float("nan"), [], "", 0, 0.0)
    for r in stub.Generate(request(ids, max_tokens), timeout=timeout):
        if r.token_ids:
            now = time.perf_counter() - t0
            out.stamps += [now] * len(r.token_ids)
            out.tokens += list(r.token_ids)
        if r.HasField("finish"):
            out.finish = r.finish.finish_reason
        if r.HasField("usage"):
            out.verify_steps, out.accept_length = r.usage.spec_verify_steps, r.usage.spec_accept_length
    out.ttft = out.stamps[0] if out.stamps else float("nan")
    return out


def load_of(port: int, role: str) -> worker_pb2.WorkerLoad:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = (worker_pb2_grpc.DecodeWorkerStub if role == "decode" else worker_pb2_grpc.PrefillWorkerStub)(ch)
        return stub.GetLoad(worker_pb2.LoadRequest(), timeout=5)


def free_pages(c: Cluster) -> dict[str, int]:
    out = {f"prefill:{p}": load_of(p, "prefill").free_pages for p in c.prefill_ports}
    out.update({f"decode:{p}": load_of(p, "decode").free_pages for p in c.decode_ports})
    return out


def wait_pages(c: Cluster, expected: dict[str, int], timeout: float = 20.0) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        seen = free_pages(c)
        if seen == expected or time.monotonic() > deadline:
            return seen
        time.sleep(0.1)


def scrape(port: int) -> tuple[float, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    vals = []
    for name in ("glmserve_kv_transfer_bytes_total", "glmserve_kv_transfer_seconds_sum"):
        m = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.MULTILINE)
        vals.append(float(m.group(1)) if m else 0.0)
    return vals[0], vals[1]


# ---------------------------------------------------------------------------------------------- checks
def compare(ctx: Ctx, label: str, two: Handle, ref: Handle, cases: list[tuple[list[int], int]], spec: bool,
            timeout: float) -> list[Gen]:
    """Same requests, one at a time, on both clusters; tokens (and spec statistics) must be equal."""
    rows, mism, stat_mism, got_ref = [], [], [], []
    for i, (ids, mt) in enumerate(cases):
        a = generate(two.stub, ids, mt, timeout)
        b = generate(ref.stub, ids, mt, timeout)
        got_ref.append(b)
        if a.tokens != b.tokens:
            k = next((j for j, (x, y) in enumerate(zip(a.tokens, b.tokens)) if x != y), min(len(a.tokens), len(b.tokens)))
            mism.append(f"req {i} (prompt {len(ids)}): first difference at output {k} of {len(b.tokens)}")
        if spec and (a.verify_steps, round(a.accept_length, 9)) != (b.verify_steps, round(b.accept_length, 9)):
            stat_mism.append(f"req {i}: two-device {a.verify_steps} steps / {a.accept_length:.4f}, "
                             f"reference {b.verify_steps} / {b.accept_length:.4f}")
        rows.append(f"| {label} | {i} | {len(ids)} | {len(a.tokens)} | {'yes' if a.tokens == b.tokens else 'NO'} | "
                    + (f"{a.verify_steps} / {a.accept_length:.3f} | {b.verify_steps} / {b.accept_length:.3f} |"
                       if spec else "- | - |"))
    ctx.report.table(f"{label}: two-device vs reference", [
        ("| config | request | prompt tokens | output tokens | tokens equal | spec steps / accept len (two-device) "
         "| (reference) |"), "|---|---|---|---|---|---|---|", *rows])
    ctx.report.put(f"compare/{label}", [{"prompt": len(ids), "tokens": g.tokens, "verify_steps": g.verify_steps,
                                         "accept_length": g.accept_length} for (ids, _), g in zip(cases, got_ref)])
    total = sum(len(g.tokens) for g in got_ref)
    ctx.report.check(f"{label}: outputs equal the reference run token for token ({len(cases)} requests, "
                     f"{total} tokens)", not mism and total > 0, "; ".join(mism[:3]))
    if spec:
        ctx.report.check(f"{label}: spec_verify_steps / spec_accept_length equal the reference run",
                         not stat_mism and all(g.verify_steps > 0 for g in got_ref), "; ".join(stat_mism[:3]))
    return got_ref


def check_cancel(ctx: Ctx, label: str, h: Handle, long_tokens: int, mid_prefill_len: int = 0) -> None:
    r = ctx.report
    before = free_pages(h.cluster)
    call = h.stub.Generate(request(prompt(11, 50), long_tokens), timeout=120)
    first = next(iter(call))
    call.cancel()
    seen = wait_pages(h.cluster, before)
    r.check(f"{label}: client cancel after the first token returns every KV page (GetLoad, both workers)",
            bool(first.token_ids) and seen == before, f"initial {before}, after {seen}")
    code = None
    try:
        for _ in h.stub.Generate(request(prompt(12, 50), long_tokens), timeout=0.5):
            pass
    except grpc.RpcError as e:
        code = e.code()
    seen = wait_pages(h.cluster, before)
    r.check(f"{label}: 0.5 s deadline -> DEADLINE_EXCEEDED, pages back", code == grpc.StatusCode.DEADLINE_EXCEEDED
            and seen == before, f"code {code}, initial {before}, after {seen}")
    if mid_prefill_len:
        call = h.stub.Generate(request(prompt(13, mid_prefill_len), 16), timeout=120)
        got: list[Any] = []
        t = threading.Thread(target=lambda: got.extend(_drain(call)), daemon=True)
        t.start()
        time.sleep(0.05)
        call.cancel()
        t.join(30)
        seen = wait_pages(h.cluster, before)
        r.check(f"{label}: cancel during prefill/KV transfer of a {mid_prefill_len}-token prompt returns every page",
                seen == before, f"initial {before}, after {seen}, outcome {got[:1]}")
    g = generate(h.stub, [5, 6, 7], 3, 60)
    r.check(f"{label}: still serves after cancellations", g.finish == "length" and len(g.tokens) == 3, g.finish)


def _drain(call: Any) -> list[str]:
    try:
        n = sum(len(r.token_ids) for r in call)
        return [f"completed ({n} tokens)"]
    except grpc.RpcError as e:
        return [str(e.code())]


def check_kill(ctx: Ctx, h: Handle, ref: Handle, long_tokens: int) -> None:
    """1 prefill + 2 decode workers; SIGKILL the decode worker with most streams."""
    r = ctx.report
    calls = [h.stub.Generate(request([7 + i, 8, 9, 10], long_tokens), timeout=120) for i in range(4)]
    iters = [iter(c) for c in calls]
    for it in iters:
        next(it)
    running = {i: load_of(p, "decode").running for i, p in enumerate(h.cluster.decode_ports)}
    victim = max(running, key=running.get)
    os.kill(h.cluster.procs[f"decode{victim}"].pid, signal.SIGKILL)
    t_kill = time.monotonic()
    outcomes: list[tuple[str, float, int]] = [("", 0.0, 0)] * 4
    lock = threading.Lock()

    def follow(k: int) -> None:
        n_after = 0
        try:
            for resp in iters[k]:
                n_after += len(resp.token_ids)
                if time.monotonic() - t_kill > 3.0:
                    calls[k].cancel()  # a survivor: healthy, stop it
            res = ("OK", time.monotonic() - t_kill, n_after)
        except grpc.RpcError as e:
            res = (e.code().name, time.monotonic() - t_kill, n_after)
        with lock:
            outcomes[k] = res

    threads = [threading.Thread(target=follow, args=(k,), daemon=True) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    unavailable = [t for code, t, _ in outcomes if code == "UNAVAILABLE"]
    survivors = [n for code, _, n in outcomes if code == "CANCELLED"]
    detail = f"running per decode worker {running}, killed decode{victim}; (code, s after kill, tokens after kill): " \
             f"{[(c, round(t, 2), n) for c, t, n in outcomes]}"
    ctx.report.put("kill/outcomes", detail)
    r.check("killed decode worker: its clients get UNAVAILABLE within 10 s",
            len(unavailable) == running[victim] and bool(unavailable) and max(unavailable) < 10.0, detail)
    if running.get(1 - victim, 0):
        r.check("killed decode worker: streams on the other decode worker keep receiving tokens",
                len(survivors) == running[1 - victim] and all(n > 0 for n in survivors), detail)
    ok, bad = 0, []
    for i in range(4):
        ids = [20 + i, 21, 22]
        try:
            a = generate(h.stub, ids, 8, 60).tokens
            b = generate(ref.stub, ids, 8, 60).tokens
            ok += a == b
            if a != b:
                bad.append(f"{ids}: {a} vs {b}")
        except grpc.RpcError as e:
            bad.append(f"{ids}: {e.code().name} {e.details()[:120]}")
    r.check("killed decode worker: new requests are served by the survivor and equal the reference", ok == 4,
            "; ".join(bad[:2]))


# ---------------------------------------------------------------------------------------------- stages
def stage_tiny(ctx: Ctx, limit: float, deadline: float) -> None:
    from common.tools.agreeing_draft import make_agreeing_draft_model
    from common.tools.tiny_model import make_tiny_model

    r = ctx.report
    with stage(r, "tiny", limit, deadline):
        tiny = make_tiny_model(ctx.work / "tiny_long", max_position_embeddings=65536)
        agree = make_agreeing_draft_model(tiny, ctx.work / "tiny_agree")
        pages = 4096
        hs = {}
        for two in (True, False):
            tag = "2dev" if two else "ref"
            hs[("plain", tag)] = ctx.launch(f"tiny_plain_{tag}", tiny, two_device=two, pages=pages)
            hs[("eagle", tag)] = ctx.launch(f"tiny_eagle_{tag}", tiny, two_device=two, worker=EAGLE, pages=pages)
            hs[("agree", tag)] = ctx.launch(f"tiny_agree_{tag}", agree, two_device=two, worker=EAGLE, pages=pages)
        hs["kill"] = ctx.launch("tiny_kill_2dev", tiny, two_device=True, decode=2, pages=pages)
        try:
            ctx.wait_ready(hs, limit * 0.6)
            cases = [(prompt(100 + i, n), 48) for i, n in enumerate((3, 17, 64, 200, 600, 1500))]
            compare(ctx, "tiny greedy", hs[("plain", "2dev")], hs[("plain", "ref")], cases, False, 120)
            compare(ctx, "tiny EAGLE 3,1,4", hs[("eagle", "2dev")], hs[("eagle", "ref")], cases, True, 120)
            got = compare(ctx, "tiny EAGLE 3,1,4 agreeing draft", hs[("agree", "2dev")], hs[("agree", "ref")],
                          cases, True, 120)
            acc = [g.accept_length for g in got]
            r.check("tiny agreeing draft: drafts accepted across devices (accept length >= 3 of max 4)",
                    min(acc) >= 3.0, f"accept lengths {[round(a, 3) for a in acc]}")
            check_cancel(ctx, "tiny two-device", hs[("plain", "2dev")], 12000)
            check_kill(ctx, hs["kill"], hs[("plain", "ref")], 12000)
        finally:
            ctx.stop(list(hs.values()))


def stage_bandwidth(ctx: Ctx, limit: float, deadline: float) -> None:
    from benchmarks.serving.bench_transport import run_kv_bandwidth

    r = ctx.report
    with stage(r, "bandwidth", limit, deadline):
        a, b = (int(ctx.dev_a.split(":")[1]), int(ctx.dev_b.split(":")[1])) if ctx.gpu else (-1, -1)
        rows = run_kv_bandwidth("nccl" if ctx.gpu else "gloo", a, b, ctx.bench_tokens, iters=2, layer_group=4,
                                timeout_s=max(20.0, min(limit, deadline - time.monotonic()) - 10))
        lines = [("| tokens | KV MiB (47 layers) | KV transport GB/s | raw GPU copy GB/s | share of raw | prefill ms | "
                  "decode ms | bytes equal |"), "|---|---|---|---|---|---|---|---|"]
        for row in rows:
            lines.append(f"| {row.tokens} | {row.bytes / 2**20:.0f} | {row.gbps:.1f} | {row.raw_copy_gbps:.1f} | "
                         f"{row.gbps / row.raw_copy_gbps * 100 if row.raw_copy_gbps else float('nan'):.0f}% | "
                         f"{row.prefill_s * 1e3:.2f} | {row.decode_s * 1e3:.2f} | {row.equal} |")
        r.table(f"KV transport bench (benchmarks.serving.bench_transport, {'nccl' if ctx.gpu else 'gloo'} {ctx.dev_a} -> {ctx.dev_b}, layer groups of 4)",
                lines)
        r.put("bandwidth/transport_bench", [row.__dict__ for row in rows])
        r.check(f"transport bench: Air-shaped KV of {'/'.join(map(str, ctx.bench_tokens))} tokens arrives "
                f"byte-equal over {'NCCL' if ctx.gpu else 'gloo'}",
                all(row.equal for row in rows) and len(rows) == len(ctx.bench_tokens))


def write_air_model(ctx: Ctx) -> subprocess.Popen | None:
    model = Path(ctx.args.air_model_dir or ctx.work / "air_layers")
    ctx.args.air_model = model
    if (model / "config.json").exists() and list(model.glob("*.safetensors")):
        return None
    code = ("import sys, torch; from benchmarks.serving.bench_e2e import AIR_LAYERS; "
            "from common.tools.tiny_model import make_tiny_model; "
            "make_tiny_model(sys.argv[1] + '.tmp', weight_dtype=torch.bfloat16, **AIR_LAYERS); "
            "import os; os.rename(sys.argv[1] + '.tmp', sys.argv[1])")
    subprocess.run(["rm", "-rf", str(model) + ".tmp"], check=False)
    return subprocess.Popen([sys.executable, "-c", code, str(model)], cwd=REPO,
                            stdout=open(ctx.report.out / "workers.log", "a"), stderr=subprocess.STDOUT)


def stage_air(ctx: Ctx, writer: subprocess.Popen | None, limits: dict[str, float], deadline: float) -> None:
    r = ctx.report
    model = ctx.args.air_model
    hs: dict[str, Handle] = {}
    ready = [False]
    try:
        with stage(r, "air: model + startup + correctness + cancellation", limits["air"], deadline):
            if writer is not None:
                t = time.monotonic()
                rc = writer.wait()
                if rc != 0 or not (model / "config.json").exists():
                    raise RuntimeError(f"writing the Air-layer model failed (rc {rc})")
                print(f"Air-layer model ready (waited {time.monotonic() - t:.0f} s)", flush=True)
            pages = 4096
            for two in (True, False):
                tag = "2dev" if two else "ref"
                hs[f"plain_{tag}"] = ctx.launch(f"air_plain_{tag}", model, two_device=two, pages=pages)
                hs[f"eagle_{tag}"] = ctx.launch(f"air_eagle_{tag}", model, two_device=two, worker=EAGLE, pages=pages)
            for g in (1, 64):
                hs[f"group{g}"] = ctx.launch(f"air_group{g}_2dev", model, two_device=True, pages=pages, metrics=True,
                                             prefill_args=["--chunked-prefill-size", "32768",
                                                           "--disagg-layer-group-size", str(g)])
            ctx.wait_ready(hs, limits["air"] * 0.6)
            ready[0] = True
            cases = [(prompt(200 + i, n), 32) for i, n in enumerate(ctx.air_prompts)]
            compare(ctx, "Air-layer greedy", hs["plain_2dev"], hs["plain_ref"], cases, False, 120)
            compare(ctx, "Air-layer EAGLE 3,1,4", hs["eagle_2dev"], hs["eagle_ref"], cases, True, 120)
            check_cancel(ctx, "Air-layer two-device", hs["plain_2dev"], 20000, mid_prefill_len=ctx.mid_prefill_len)
        refs = [hs.pop(k) for k in ("plain_ref", "eagle_ref") if k in hs]
        ctx.stop(refs)  # nothing else runs on the GPUs while measuring
        if not ready[0]:
            r.check("air: concurrency and overlap stages ran", False, "the Air-layer clusters never became ready")
            return
        if "plain_2dev" in hs:
            with stage(r, "concurrency", limits["concurrency"], deadline):
                stage_concurrency(ctx, hs["plain_2dev"], hs["eagle_2dev"])
        if "group1" in hs:
            with stage(r, "overlap + end-to-end KV bandwidth", limits["overlap"], deadline):
                stage_overlap(ctx, hs["group1"], hs["group64"])
    finally:
        ctx.stop(list(hs.values()))


class _Batches:
    """Batches of concurrent greedy requests to one cluster, each request with a fresh prompt seed."""

    def __init__(self, handle: Handle) -> None:
        self.handle, self.seed = handle, 1000

    def __call__(self, n: int, plen: int, mt: int) -> list[Gen]:
        first, self.seed = self.seed + n, self.seed + n
        stub = self.handle.stub
        with ThreadPoolExecutor(n) as pool:
            return list(pool.map(lambda s: generate(stub, prompt(s, plen), mt, 120), range(first, first + n)))


CONC_HEAD = ["| spec | concurrency | prompt | TTFT p50 (ms) | TTFT max (ms) | ITL p50 (ms) | output tok/s |",
             "|---|---|---|---|---|---|---|"]


def measure_concurrency(h: Handle, label: str, levels: tuple[int, ...], plen: int, out_tokens: int = 64,
                        timeout: float = 120.0) -> tuple[list[dict], list[str]]:
    """TTFT (client side, p50/max), inter-token latency (p50 of each request's (t_last - t_first)/(n - 1))
    and output tokens/s of `levels` concurrent greedy requests of `plen`-token prompts; one unmeasured
    round per level first. Returns (records, table rows)."""
    res, rows = [], []
    batch = _Batches(h)
    generate(h.stub, prompt(1, plen), 4, timeout)
    for conc in levels:
        batch(conc, plen, 8)  # unmeasured: kernels for these shapes
        t = time.perf_counter()
        gens = batch(conc, plen, out_tokens)
        wall = time.perf_counter() - t
        ttft = [g.ttft for g in gens]
        itl = [(g.stamps[-1] - g.stamps[0]) / (len(g.stamps) - 1) for g in gens if len(g.stamps) > 1]
        toks = sum(len(g.tokens) for g in gens)
        rec = {"spec": label, "concurrency": conc, "prompt": plen, "ttft_p50_ms": statistics.median(ttft) * 1e3,
               "ttft_max_ms": max(ttft) * 1e3, "itl_p50_ms": statistics.median(itl) * 1e3 if itl else float("nan"),
               "tok_s": toks / wall, "tokens": toks, "requests": len(gens)}
        res.append(rec)
        rows.append(f"| {label} | {conc} | {plen} | {rec['ttft_p50_ms']:.1f} | {rec['ttft_max_ms']:.1f} | "
                    f"{rec['itl_p50_ms']:.2f} | {rec['tok_s']:.0f} |")
        print(rows[-1], flush=True)
    return res, rows


def stage_concurrency(ctx: Ctx, plain: Handle, eagle: Handle) -> None:
    rows, res = list(CONC_HEAD), []
    for label, h in (("off", plain), ("EAGLE 3,1,4", eagle)):
        got, lines = measure_concurrency(h, label, ctx.concurrency, ctx.conc_prompt)
        res += got
        rows += lines
    ctx.report.table(f"TTFT / inter-token latency (Air-layer model, prefill {ctx.dev_a}, decode {ctx.dev_b}, {'NCCL' if ctx.gpu else 'gloo'})",
                     rows)
    ctx.report.put("concurrency", res)


def stage_overlap(ctx: Ctx, g1: Handle, g64: Handle) -> None:
    sizes = ctx.overlap_sizes
    data: dict[tuple[int, int], list[tuple[float, float, float]]] = {}
    for n, reps in sizes:
        for h in (g64, g1):  # unmeasured: pairing, kernels for this size
            generate(h.stub, prompt(n, n), 2, 180)
        for rep in range(reps):
            for g, h in ((64, g64), (1, g1)):
                b0, s0 = scrape(h.metrics_port)
                gen = generate(h.stub, prompt(n * 10 + rep, n), 2, 180)
                b1, s1 = scrape(h.metrics_port)
                data.setdefault((n, g), []).append((gen.ttft, b1 - b0, s1 - s0))
    rows = [("| prompt | KV MiB (4 layers) | e2e KV GB/s, group 64 (pure transfer) | decode-side first->last chunk, "
             "group 1 (ms) | TTFT group 64 (ms) | TTFT group 1 (ms) | TTFT spread (ms) | transfer (ms) | hidden share |"),
            "|---|---|---|---|---|---|---|---|---|"]
    res = []
    raw = {row["tokens"]: row for row in ctx.report.results.get("bandwidth/transport_bench", [])}
    for n, _ in sizes:
        u, s = data[(n, 64)], data[(n, 1)]
        xfer = statistics.median(x[2] for x in u)
        nbytes = statistics.median(x[1] for x in u)
        t64, t1 = statistics.median(x[0] for x in u), statistics.median(x[0] for x in s)
        spread = max(max(x[0] for x in u) - min(x[0] for x in u), max(x[0] for x in s) - min(x[0] for x in s)) / 2
        hidden = (t64 - t1) / xfer if xfer > 0 else float("nan")
        noisy = abs(t64 - t1) < spread or xfer < spread
        rec = {"tokens": n, "kv_bytes": nbytes, "e2e_gbps": nbytes / xfer / 1e9 if xfer else float("nan"),
               "transfer_ms": xfer * 1e3, "streamed_first_to_last_ms": statistics.median(x[2] for x in s) * 1e3,
               "ttft_group64_ms": t64 * 1e3, "ttft_group1_ms": t1 * 1e3, "ttft_spread_ms": spread * 1e3,
               "hidden_share": hidden, "within_noise": noisy, "raw_copy_gbps": raw.get(n, {}).get("raw_copy_gbps"),
               "transport_bench_gbps": raw.get(n, {}).get("gbps"),
               "samples": {str(k): v for k, v in data.items() if k[0] == n}}
        res.append(rec)
        rows.append(f"| {n} | {nbytes / 2**20:.1f} | {rec['e2e_gbps']:.1f} | {rec['streamed_first_to_last_ms']:.2f} | "
                    f"{t64 * 1e3:.1f} | {t1 * 1e3:.1f} | ±{spread * 1e3:.1f} | {xfer * 1e3:.2f} | "
                    f"{hidden * 100:.0f}%{' (within noise)' if noisy else ''} |")
    lines = rows + ["", ("Raw numbers for the same token counts: the transport bench table above (47-layer Air KV) "
                         "and its raw GPU-to-GPU copy GB/s. e2e GB/s here moves 4-layer KV (4/47 of the bench's bytes), "
                         "so fixed per-message costs weigh more. Hidden share = (TTFT group 64 - TTFT group 1) / "
                         "transfer; at most 75% with 4 layers (the last layer goes with the first token).")]
    ctx.report.table("End-to-end KV bandwidth and transfer hidden under prefill compute (Air-layer model, one "
                     "forward per prompt)", lines)
    ctx.report.put("overlap", res)
    ctx.report.check("overlap: every prompt size produced KV bytes and transfer times on the decode worker",
                     all(r["kv_bytes"] > 0 and r["transfer_ms"] > 0 for r in res))


# ---------------------------------------------------------------------------------------------- tp
TP_PAIRS = ((2, 2), (4, 2))  # (prefill TP, decode TP)


def tp_bases(devices: int, ptp: int, dtp: int) -> tuple[int, int]:
    """(prefill base GPU, decode base GPU): the decode ranks after the prefill ranks when the host has
    ptp + dtp GPUs; otherwise on the last dtp GPUs, shared with prefill ranks (those rank pairs move
    KV over CUDA IPC, the others over NCCL)."""
    return (0, ptp) if ptp + dtp <= devices else (0, devices - dtp)


def launch_tp(ctx: Ctx, name: str, model: Path, ptp: int, dtp: int, worker: list[str], pages: int | None,
              decode_args: list[str] = ()) -> Handle:
    """A cluster of one prefill worker of TP ptp and one decode worker of TP dtp (`glmserve local
    --prefill-tp-size ptp --decode-tp-size dtp`), placed by tp_bases; KV backend auto."""
    log_dir = ctx.work / "logs" / name
    if ctx.gpu:
        pbase, dbase = tp_bases(ctx.ngpu, ptp, dtp)
        pdev, ddev = (["--device", f"cuda:{pbase}", "--base-gpu-id", str(pbase)],
                      ["--device", f"cuda:{dbase}", "--base-gpu-id", str(dbase)])
        where = f"prefill GPUs {pbase}-{pbase + ptp - 1}, decode GPUs {dbase}-{dbase + dtp - 1}"
    else:
        pdev, ddev, where = ["--device", "cpu"], ["--device", "cpu"], "CPU (gloo)"
    wargs = [*(["--num-pages", str(pages)] if pages else []), "--transfer-timeout", "60", "--shutdown-grace", "5",
             *worker]
    cluster = start_cluster(model, prefill=1, decode=1, extra_worker_args=wargs,
                            extra_prefill_args=[*pdev, "--tp-size", str(ptp)],
                            extra_decode_args=[*ddev, "--tp-size", str(dtp), "--max-running-requests", "64",
                                               *decode_args],
                            log_dir=log_dir)
    h = Handle(name, cluster, log_dir)
    h.relaunch = lambda: launch_tp(ctx, name, model, ptp, dtp, worker, pages, decode_args)
    ctx.handles.append(h)
    print(f"started {name}: prefill TP {ptp}, decode TP {dtp}, {where}, model {model.name}", flush=True)
    return h


def stage_tp(ctx: Ctx, limit: float, deadline: float) -> None:
    """Greedy outputs of (prefill TP, decode TP) clusters equal the single-device reference cluster's,
    plain and EAGLE 3,1,4; float32 on both (TP changes the order of the all-reduce sums: in fp32 the
    difference stays far below the tiny model's logit gaps, in bf16 it would not)."""
    from common.tools.tiny_model import make_tiny_model

    r = ctx.report
    with stage(r, "tp: greedy equality of TP clusters", limit, deadline):
        tiny = make_tiny_model(ctx.work / "tiny_long", max_position_embeddings=65536)
        fp32 = ["--dtype", "float32"]
        refs = {"plain": ctx.launch("tp_ref_plain", tiny, two_device=False, worker=fp32, pages=4096),
                "eagle": ctx.launch("tp_ref_eagle", tiny, two_device=False, worker=[*fp32, *EAGLE], pages=4096)}
        try:
            ctx.wait_ready(refs, limit * 0.3)
            cases = [(prompt(300 + i, n), 32) for i, n in enumerate(ctx.tp_prompts)]
            for ptp, dtp in TP_PAIRS:
                if ctx.gpu and ctx.ngpu < ptp:
                    r.check(f"tp: prefill TP {ptp} + decode TP {dtp} has its GPUs", False, f"{ctx.ngpu} GPUs")
                    continue
                hs = {"plain": launch_tp(ctx, f"tp_p{ptp}_d{dtp}_plain", tiny, ptp, dtp, fp32, 4096),
                      "eagle": launch_tp(ctx, f"tp_p{ptp}_d{dtp}_eagle", tiny, ptp, dtp, [*fp32, *EAGLE], 4096)}
                try:
                    ctx.wait_ready(hs, max(30.0, min(limit, deadline - time.monotonic()) * 0.4))
                    compare(ctx, f"TP {ptp} -> TP {dtp} greedy", hs["plain"], refs["plain"], cases, False, 120)
                    compare(ctx, f"TP {ptp} -> TP {dtp} EAGLE 3,1,4", hs["eagle"], refs["eagle"], cases, True, 120)
                finally:
                    ctx.stop(list(hs.values()))
        finally:
            ctx.stop(list(refs.values()))


def glm45_layers_that_fit(gpu_bytes: int, tp: int, full: dict, headroom: float = 0.7) -> int:
    """Decoder layers of the FP8 GLM-4.5 whose TP `tp` rank (+ MTP layer) fits `headroom` of a GPU
    (the rest, at --mem-fraction-static 0.9, is a KV pool for 64 streams of 1K tokens, graphs and the
    collectives' buffers): all 92 on an H200, 59 on an H100.
    Every MoE layer past the dense ones adds the same bytes: two meta builds give the line."""
    import torch

    from benchmarks.model_step.air_model import weight_bytes_at
    from common.model.layers import LocalRank

    first = full["first_k_dense_replace"] + 1
    at = [weight_bytes_at(full, n, torch.bfloat16, True, tp=LocalRank(0, tp)) for n in (first, first + 1)]
    extra = int((headroom * gpu_bytes - at[0]) // (at[1] - at[0]))
    return max(first, min(full["num_hidden_layers"], first + extra))


def stage_glm45(ctx: Ctx, limit: float, deadline: float) -> None:
    """GLM-4.5 (FP8, dummy weights) disaggregated on one host: prefill TP 4 (GPUs 0-3) + decode TP 4
    (GPUs 4-7), TTFT / ITL / throughput at ctx.glm45_levels concurrent streams, plain and EAGLE 3,1,4
    (one cluster at a time). On the CPU (--exercise-all) the same flow at tiny widths (real vocabulary)."""
    from benchmarks.model_step.air_model import GLM45_FULL, TINY_WIDTHS
    from common.tools.tiny_model import make_tiny_model

    r = ctx.report
    with stage(r, "glm45: TP 4 + TP 4 FP8 dummy-weight deployment", limit, deadline):
        fields = dict(GLM45_FULL)
        if ctx.gpu:
            import torch

            layers = glm45_layers_that_fit(torch.cuda.get_device_properties(0).total_memory, 4, fields)
        else:
            fields.update({k: v for k, v in TINY_WIDTHS.items() if k != "vocab_size"})  # the real vocabulary
            layers = 4
        full = fields["num_hidden_layers"]
        fields.update(num_hidden_layers=layers, first_k_dense_replace=min(fields["first_k_dense_replace"], layers - 1))
        fields.pop("architectures", None)
        fields.pop("model_type", None)
        model = make_tiny_model(ctx.work / f"glm45_fp8_{layers}l_config", weights=False, quantization="fp8-channel",
                                **fields)
        depth = "full depth" if layers == full else f"{layers} of {full} layers" + (
            " (the full depth does not fit a TP 4 rank of this GPU)" if ctx.gpu else ", tiny widths, real vocabulary")
        r.stage(f"glm45: GLM-4.5 FP8 dummy weights, {depth}, model dir {model} (config.json + tokenizer only)")
        rows, res = list(CONC_HEAD), []
        worker = ["--load-format", "dummy", *(["--dtype", "bfloat16", "--mem-fraction-static", "0.9"] if ctx.gpu else [])]
        specs = [(label, extra) for key, label, extra in (("off", "off", []), ("eagle", "EAGLE 3,1,4", EAGLE))
                 if key in ctx.args.glm45_spec.split(",")]
        for label, extra in specs:
            h = launch_tp(ctx, f"glm45_tp4_tp4_{'eagle' if extra else 'plain'}", model, 4, 4, [*worker, *extra],
                          None if ctx.gpu else 2048)
            try:
                ctx.wait_ready({0: h}, max(60.0, min(limit, deadline - time.monotonic()) * 0.6))
                got, lines = measure_concurrency(h, label, ctx.glm45_levels, ctx.conc_prompt, timeout=300)
                res += got
                rows += lines
            finally:
                ctx.stop([h])
        r.table(f"GLM-4.5 FP8 ({depth}, dummy weights): prefill TP 4 + decode TP 4 on one host, "
                f"{'NCCL' if ctx.gpu else 'gloo'}", rows)
        r.put("glm45", {"layers": layers, "full_layers": full, "rows": res})
        r.check("glm45: every concurrency level streamed all its tokens",
                all(x["tokens"] == x["requests"] * 64 for x in res) and len(res) == len(specs) * len(ctx.glm45_levels),
                f"{len(res)} levels measured")


# ---------------------------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", default="cuda:0,cuda:1",
                    help="prefill device,decode device (cpu,cpu: gloo); four or more cpu entries: the tp stage on the CPU")
    ap.add_argument("--stages", default="auto",
                    help="comma list of tiny, bandwidth, air, tp, glm45 (auto: tiny, bandwidth and air on GPUs, tp "
                         "with >= 4 GPUs (or 4 cpu devices), glm45 with >= 8 GPUs (or 8 cpu devices with --exercise-all))")
    ap.add_argument("--out", default=os.environ.get("OUT") or "/tmp/glmserve_multi_gpu_out")
    ap.add_argument("--work-dir", default="/tmp/glmserve_multi_gpu", help="models and process logs")
    ap.add_argument("--air-model-dir", default=None, help="reuse an Air-layer model directory")
    ap.add_argument("--glm45-spec", default="off,eagle",
                    help="glm45 stage: the clusters to measure, one after the other (off: plain decode; eagle: EAGLE 3,1,4)")
    ap.add_argument("--budget-s", type=float, default=500.0, help="global deadline for all stages")
    ap.add_argument("--stage-scale", type=float, default=None, help="multiply stage limits (default 1 GPU, 5 CPU)")
    ap.add_argument("--exercise-all", action="store_true",
                    help="CPU only: also run the bandwidth (gloo), Air, concurrency and overlap stages with the tiny "
                         "model in place of the Air-layer model and small sizes (validates the code paths)")
    args = ap.parse_args()
    devices = args.devices.split(",")
    dev_a, dev_b = devices[0], devices[1]
    gpu = dev_a.startswith("cuda")
    out, work = Path(args.out), Path(args.work_dir)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    (out / "workers.log").write_text("")
    scale = args.stage_scale or (1.0 if gpu else 5.0)
    deadline = T0 + args.budget_s * (1.0 if gpu else scale)
    header = ["# glmserve two-device disaggregated run", "",
              (f"devices: prefill {dev_a}, decode {dev_b}; KV: {'NCCL' if gpu else 'gloo'} (reference: both on "
               f"{dev_a}, {'CUDA IPC' if gpu else 'gloo'}); dtype {'bfloat16' if gpu else 'float32 (CPU default)'}; "
               f"greedy; EAGLE 3,1,4"),
              f"commit: {_git('rev-parse', 'HEAD')}{' (dirty)' if _git('status', '--porcelain', '--', 'common', 'prefill_worker', 'decode_worker', 'gateway') else ''}",
              f"env: {' '.join(f'{k}={os.environ.get(k)}' for k in NCCL_SAFE_ENV)}"]
    if gpu:
        import torch

        header.append(f"GPUs: {_smi()}; torch {torch.__version__}")
        header.append(f"topology: {_topo()}")
    report = Report(out, header)
    report.write()
    ctx = Ctx(args, report, dev_a, dev_b, gpu, work)
    if gpu:
        import torch

        ctx.ngpu = torch.cuda.device_count()
    else:
        ctx.ngpu = len(devices)
        ctx.tp_prompts, ctx.glm45_levels = (3, 17, 64, 200), (1, 2, 4)
    if not gpu and args.exercise_all:
        ctx.bench_tokens, ctx.overlap_sizes, ctx.concurrency = (256, 1024), ((256, 3), (1024, 3), (2048, 2)), (1, 2, 4)
        ctx.conc_prompt, ctx.air_prompts, ctx.mid_prefill_len = 128, (5, 100, 700), 1500
    if args.stages == "auto":
        chosen = {"tiny", "bandwidth", "air"} if gpu else {"tiny"} | ({"bandwidth", "air"} if args.exercise_all else set())
        chosen |= {"tp"} if ctx.ngpu >= 4 else set()
        chosen |= {"glm45"} if ctx.ngpu >= 8 and (gpu or args.exercise_all) else set()
    else:
        chosen = set(args.stages.split(","))
        unknown = chosen - {"tiny", "bandwidth", "air", "tp", "glm45"}
        if unknown:
            ap.error(f"--stages: unknown {sorted(unknown)} (tiny, bandwidth, air, tp, glm45)")
    report.stage(f"stages: {', '.join(sorted(chosen))}; {ctx.ngpu} {'GPUs' if gpu else 'CPU devices'}")
    if gpu:
        import torch

        need = max(int(dev_a.split(":")[1]), int(dev_b.split(":")[1])) + 1
        if {"tp", "glm45"} & chosen:
            need = max(need, 4 if "tp" in chosen else 1, 8 if "glm45" in chosen else 1)
        if torch.cuda.device_count() < need or dev_a == dev_b:
            report.check(f"machine has the distinct GPUs {dev_a}, {dev_b} (and {need} for the stages asked)", False,
                         f"{torch.cuda.device_count()} visible")
            return 1
    writer = write_air_model(ctx) if gpu and "air" in chosen else None
    try:
        if "tiny" in chosen:
            stage_tiny(ctx, 170 * scale, deadline)
        if gpu:
            if "bandwidth" in chosen:
                stage_bandwidth(ctx, 75, deadline)
            if "air" in chosen:
                stage_air(ctx, writer, {"air": 170, "concurrency": 60, "overlap": 60}, deadline)
        elif {"bandwidth", "air"} & chosen:
            from common.tools.tiny_model import make_tiny_model

            report.stage("CPU: the tiny model stands in for the Air-layer model; sizes shrunk")
            args.air_model = make_tiny_model(work / "tiny_long", max_position_embeddings=65536)
            if "bandwidth" in chosen:
                stage_bandwidth(ctx, 200 * scale, deadline)
            if "air" in chosen:
                stage_air(ctx, None, {"air": 170 * scale, "concurrency": 60 * scale, "overlap": 60 * scale}, deadline)
        else:
            report.stage("CPU mode: Air-layer model, bandwidth, concurrency and overlap stages skipped")
        if "tp" in chosen:
            stage_tp(ctx, 300 * scale, deadline)
        if "glm45" in chosen:
            stage_glm45(ctx, 520 * scale, deadline)
    finally:
        ctx.stop(list(ctx.handles))
        if writer is not None and writer.poll() is None:
            writer.kill()
    fails = sum(not ok for _, ok, _ in report.checks)
    print(f"RESULT: {len(report.checks) - fails} PASS, {fails} FAIL in {time.monotonic() - T0:.0f} s; "
          f"summary {out / 'MULTI_GPU.md'}", flush=True)
    return 1 if fails else 0


def _git(*a: str) -> str:
    try:
        return subprocess.run(["git", *a], cwd=REPO, check=False, capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001
        return "unknown"


def _smi() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=index,name,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20, check=False).stdout.strip().replace("\n", "; ")
    except Exception:  # noqa: BLE001
        return "unknown"


def _topo() -> str:
    try:
        text = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=20, check=False).stdout
        m = re.search(r"^GPU0\s+\S+\s+(\S+)", text, re.MULTILINE)
        return f"GPU0-GPU1 {m.group(1)}" if m else "unknown"
    except Exception:  # noqa: BLE001
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
