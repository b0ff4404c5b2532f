"""Agent sessions through the OpenAI HTTP API, with every prefix cache on and with every cache off.

    python3 -m benchmarks.serving.bench_agent_replay [--device cuda:0] [--sessions 8] [--template glm47]
        [--keep-thinking | --clear-thinking] [--system-chars 7500] [--result-chars 3700] [--steps 8] [--tiny]

Each session replays a scripted coding-agent conversation (benchmarks/serving/template_reuse.py:
agent_turns, its own seed: a system prompt, one tool, user turns of `--steps` tool calls each, every
call followed by its result, then an answer, reasoning in every assistant turn) as `/v1/chat/completions`
requests with the tool list, each request the whole history so far, as an agent sends it. GLM-4.7's
template with `chat_template_kwargs: {"clear_thinking": false}` by default (`--clear-thinking`: the
template's default, which drops earlier turns' reasoning; `--template glm45`: GLM-4.5/4.6's).

Two clusters run at once on the same device (gateway + prefill + decode each, HTTP on): every cache on,
and `--disable-radix-cache` on all three processes. Every request goes to both, back to back, which one
first alternating, with `max_tokens` 1: its latency is the time to the first token. Reported per
cluster: the token hit rate (`usage.prompt_tokens_details.cached_tokens` over prompt tokens, all
requests), the share of requests with a hit, the mean time to first token per session (mean over the
session's requests, then over sessions); the ratio of the two clusters' session means (targets: hit
rate >= 80 %, session mean TTFT <= 0.5x the caches off). The first request of each session finds
nothing cached and counts in both. The assistant turns are the script's, not the model's output
(random weights), so the hits are the prompt pages both workers keep; a real model's turn rendered
back exactly as it was produced would also find its output pages on the decode worker. With OUT
set, writes $OUT/bench_agent_replay.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks import measure
from benchmarks.serving.bench_e2e import AIR_LAYERS, serving_model
from benchmarks.serving.template_reuse import TOOLS, agent_turns
from common.tools.launch import start_cluster


def chat(base_url: str, model: str, messages: list[dict], kwargs: dict) -> tuple[float, int, int]:
    """One request with max_tokens 1: (seconds to the answer, prompt tokens, cached tokens)."""
    body = {"model": model, "messages": messages, "tools": TOOLS, "max_tokens": 1, "temperature": 0,
            "chat_template_kwargs": kwargs}
    request = urllib.request.Request(f"{base_url}/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        usage = json.loads(response.read())["usage"]
    elapsed = time.perf_counter() - start
    return elapsed, usage["prompt_tokens"], (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)


class Side:
    def __init__(self, args: argparse.Namespace, model: Path, cache_on: bool) -> None:
        self.name = "caches on" if cache_on else "caches off"
        off = [] if cache_on else ["--disable-radix-cache"]
        if args.device.startswith("cuda"):  # 2 clusters of 2 workers on 1 GPU
            shared = ["--mem-fraction-static", "0.2"]
        else:  # the CPU's default pool (2047 pages) holds one long agent context, not one per session
            shared = ["--num-pages", str(args.sessions * 2048 + 1024)]
        self.cluster = start_cluster(
            model, prefill=1, decode=1, extra_worker_args=shared + off,
            extra_prefill_args=["--device", args.device, "--chunked-prefill-size", "8192"],
            extra_decode_args=["--device", args.device],
            extra_gateway_args=["--served-model-name", "glm", *off],
            log_dir=Path(args.log_dir) / self.name.replace(" ", "_"))
        self.rows: list[tuple[int, float, int, int]] = []  # (session, seconds, prompt, cached)

    def summary(self) -> dict[str, float]:
        sessions: dict[int, list[float]] = {}
        for s, sec, _, _ in self.rows:
            sessions.setdefault(s, []).append(sec)
        return {"requests": len(self.rows), "prompt_tokens": statistics.mean(r[2] for r in self.rows),
                "hit_rate": sum(r[3] for r in self.rows) / sum(r[2] for r in self.rows),
                "hit_requests": sum(r[3] > 0 for r in self.rows) / len(self.rows),
                "session_ttft_ms": statistics.mean(statistics.mean(v) for v in sessions.values()) * 1e3}


def run(args: argparse.Namespace, model: Path) -> tuple[dict[str, float], dict[str, float]]:
    sides = [Side(args, model, True), Side(args, model, False)]
    kwargs = {"clear_thinking": False} if args.keep_thinking else {}
    script = {"system_chars": args.system_chars, "result_chars": args.result_chars, "steps": tuple(args.steps)}

    def session(s: int) -> None:
        messages, ends = agent_turns(1000 + s, **script)
        for i, end in enumerate(ends):
            for side in sides if (s + i) % 2 == 0 else sides[::-1]:
                sec, prompt, cached = chat(side.cluster.http_base_url, "glm", messages[:end + 1], kwargs)
                side.rows.append((s, sec, prompt, cached))

    try:
        for side in sides:
            side.cluster.wait_ready(300)
        warm_messages, warm_ends = agent_turns(0, **script)  # unmeasured: kernels for these shapes
        for side in sides:
            chat(side.cluster.http_base_url, "glm", warm_messages[:warm_ends[-1] + 1], kwargs)
        with ThreadPoolExecutor(args.sessions) as pool:
            list(pool.map(session, range(args.sessions)))
    finally:
        for side in sides:
            side.cluster.stop()
    return sides[0].summary(), sides[1].summary()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda:0", help="device of every worker")
    ap.add_argument("--sessions", type=int, default=8, help="agent sessions at once")
    ap.add_argument("--template", choices=("glm45", "glm47"), default="glm47")
    thinking = ap.add_mutually_exclusive_group()
    thinking.add_argument("--keep-thinking", dest="keep_thinking", action="store_true", default=True,
                          help="GLM-4.7: clear_thinking false, every turn's reasoning kept (default)")
    thinking.add_argument("--clear-thinking", dest="keep_thinking", action="store_false",
                          help="the template's default: earlier turns' reasoning dropped")
    # defaults: the spec's agent at real lengths in the tiny tokenizer's tokens (~1.9 characters a token):
    # a 4K-token system prompt, 2K-token tool results, 8 tool steps in a user turn, then the next user turn
    ap.add_argument("--system-chars", type=int, default=7500, help="system prompt length in characters")
    ap.add_argument("--result-chars", type=int, default=3700, help="each tool result's length in characters")
    ap.add_argument("--steps", default="8", help="tool calls in each user turn (comma list: one per turn)")
    ap.add_argument("--tiny", action="store_true", help="the tiny 3-layer model (CPU smoke run)")
    ap.add_argument("--log-dir", default=os.path.join(tempfile.gettempdir(), "glmserve_bench_agent_replay"))
    args = ap.parse_args()
    args.steps = [int(v) for v in args.steps.split(",")]
    # the default script's last prompt is ~27K tokens (the tiny model's default context is 1K)
    model = serving_model(args.tiny, template=args.template,
                          max_position_embeddings=AIR_LAYERS["max_position_embeddings"])
    on, off = run(args, model)
    what = (f"{args.sessions} agent sessions at once, {args.template} template"
            f"{', clear_thinking false' if args.keep_thinking and args.template == 'glm47' else ''}; system prompt "
            f"{args.system_chars} characters, tool results {args.result_chars}, tool calls per user turn "
            f"{args.steps}; {on['requests']} requests a cluster, {on['prompt_tokens']:.0f} prompt tokens on average")
    rows = [what, "", "| cluster | token hit rate | requests with a hit | session mean TTFT (ms) |", "|---|---|---|---|"]
    for name, r in (("caches on", on), ("caches off", off)):
        rows.append(f"| {name} | {r['hit_rate']:.1%} | {r['hit_requests']:.1%} | {r['session_ttft_ms']:.1f} |")
    rows.append(f"| on / off | (target >= 80 %) | | {on['session_ttft_ms'] / off['session_ttft_ms']:.2f}x "
                "(target <= 0.5) |")
    text = "\n".join(rows)
    measure.publish("bench_agent_replay.md", args.device, text)


if __name__ == "__main__":
    main()
