"""How much of each agent request's prompt a prefix cache can reuse, as the GLM templates render it.

    python3 -m benchmarks.serving.template_reuse [--model-dir DIR] [--seed 0]

A scripted agent conversation (a system prompt and one tool; user -> call -> tool result -> call
-> result -> answer -> new user -> call -> result -> answer -> new user) is rendered with glmserve's
`glm45.jinja` (GLM-4.5/4.6) and `glm47.jinja` (GLM-4.7: default, `clear_thinking: false`, and
`clear_thinking: false` with a client that drops `reasoning_content`) through gateway.chat_template
and tokenized with the model directory's tokenizer (default: the tiny tokenizer, whose special
tokens are atomic like GLM's; it splits text into more tokens than GLM's, so the ratios, not the
counts, carry over). The model's outputs are what the template renders for the turn it produced.

For each request after the first:
- prompt-only: longest common token prefix with the previous request's prompt (what a prefill-side
  cache can reuse), in % of this request's prompt;
- + output: with the previous prompt followed by its output (what a cache of prompt and output
  pages -- the decode side -- could reuse).
Numbers are before page rounding (whole 16-token pages only; one page less with the MTP rule).
"""

from __future__ import annotations

import argparse
import itertools
import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.chat_template import ChatTemplate
from gateway.tokenizer import Tokenizer

TOOLS = [{"type": "function", "function": {
    "name": "search_code", "description": "Search the repository for a regular expression.",
    "parameters": {"type": "object", "properties": {
        "pattern": {"type": "string", "description": "the regular expression"},
        "path": {"type": "string", "description": "folder to search"}}, "required": ["pattern"]}}}]
ROWS = ("1st tool result", "2nd tool result", "new user turn", "tool result", "new user turn")


@dataclass(frozen=True)
class Variant:
    name: str
    template: str                # "glm45" | "glm47"
    kwargs: dict[str, Any]       # chat_template_kwargs
    send_reasoning: bool = True  # the client returns reasoning_content with each assistant turn


VARIANTS = (
    Variant("GLM-4.5/4.6", "glm45", {}),
    Variant("GLM-4.7 default", "glm47", {}),
    Variant("GLM-4.7 clear_thinking:false", "glm47", {"clear_thinking": False}),
    Variant("GLM-4.7 clear_thinking:false, reasoning dropped", "glm47", {"clear_thinking": False},
            send_reasoning=False),
)


@dataclass(frozen=True)
class Reuse:
    tokens: int       # the request's prompt
    prompt_only: int  # common prefix with the previous prompt
    with_output: int  # common prefix with the previous prompt + its output


def _words(rng: random.Random, chars: int) -> str:
    vocab = ("the", "function", "returns", "value", "cache", "page", "worker", "request", "token", "prefix",
             "index", "router", "decode", "prefill", "error", "test", "file", "line", "config", "model")
    out: list[str] = []
    while sum(len(w) + 1 for w in out) < chars:
        out.append(rng.choice(vocab))
    return " ".join(out)


def agent_turns(seed: int = 0, system_chars: int = 1000, result_chars: int = 1400, reasoning_chars: int = 1400,
                steps: tuple[int, ...] = (2, 1)) -> tuple[list[dict[str, Any]], list[int]]:
    """The whole conversation, and the index of each request's last message (a request = the
    messages up to it; the model answers with the message after it). `steps`: tool calls in each
    user turn, each followed by its result, then the turn's answer; one more user message ends it."""
    rng = random.Random(seed)
    handlers = itertools.count()

    def call() -> dict[str, Any]:
        return {"role": "assistant", "content": "", "reasoning_content": _words(rng, reasoning_chars),
                "tool_calls": [{"type": "function", "function": {
                    "name": "search_code", "arguments": {"pattern": f"def handler_{next(handlers)}", "path": "src"}}}]}

    def answer() -> dict[str, Any]:
        return {"role": "assistant", "content": _words(rng, 300), "reasoning_content": _words(rng, reasoning_chars)}

    def result() -> dict[str, Any]:
        return {"role": "tool", "content": _words(rng, result_chars)}

    msgs = [{"role": "system", "content": _words(rng, system_chars)}]
    for calls in steps:
        msgs.append({"role": "user", "content": _words(rng, 200)})
        for _ in range(calls):
            msgs += [call(), result()]
        msgs.append(answer())
    msgs.append({"role": "user", "content": _words(rng, 200)})
    ends = [i for i, m in enumerate(msgs) if m["role"] in ("user", "tool") and
            (i + 1 == len(msgs) or msgs[i + 1]["role"] == "assistant")]
    return msgs, ends


def _lcp(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def measure(template: ChatTemplate, encode: Callable[[str], list[int]], variant: Variant,
            seed: int = 0) -> list[Reuse]:
    """The reuse of each request after the first."""
    produced, ends = agent_turns(seed)  # what the model produced (it always reasons)
    sent = produced if variant.send_reasoning else \
        [{k: v for k, v in m.items() if k != "reasoning_content"} for m in produced]
    kwargs = variant.kwargs
    prompts, with_output = [], []
    for end in ends:
        history = sent[:end + 1]
        prompt = template.render(history, TOOLS, chat_template_kwargs=kwargs)
        prompts.append(encode(prompt))
        if end + 1 < len(produced):  # its output: the next turn as rendered right after it was produced
            full = template.render([*history, produced[end + 1]], TOOLS, add_generation_prompt=False,
                                   chat_template_kwargs=kwargs)
            assert full.startswith(prompt), "the turn does not continue its generation prompt"
            with_output.append(prompts[-1] + encode(full[len(prompt):]))
    return [Reuse(len(prompts[i]), _lcp(prompts[i - 1], prompts[i]), _lcp(with_output[i - 1], prompts[i]))
            for i in range(1, len(prompts))]


def table(model_dir: Path | None = None, seed: int = 0) -> str:
    """The markdown table of every variant (tokenizer: `model_dir`'s, else the tiny one)."""
    from common.tools.tiny_tokenizer import chat_template_source, write_tokenizer_files

    tmp = Path(tempfile.mkdtemp(prefix="glmserve_template_reuse_"))
    cols = []
    for v in VARIANTS:
        d = model_dir
        if d is None:
            d = tmp / v.template
            write_tokenizer_files(d, v.template)
        template = ChatTemplate(chat_template_source(v.template))  # glmserve's template of that family
        cols.append(measure(template, Tokenizer.from_dir(d).encode, v, seed))
    lines = ["| next request | " + " | ".join(f"{v.name}: prompt-only | + output" for v in VARIANTS) + " |",
             "|---" * (1 + 2 * len(VARIANTS)) + "|"]
    def pct(part: int, whole: int) -> str:
        return f"{100 * part / whole:.0f} %"

    for r, row in enumerate(ROWS):
        lines.append(f"| {row} | " + " | ".join(f"{pct(c[r].prompt_only, c[r].tokens)} | "
                                                f"{pct(c[r].with_output, c[r].tokens)}" for c in cols) + " |")
    lines.append("| tokens computed, all five | " + " | ".join(
        f"{sum(x.tokens - x.prompt_only for x in c)} | {sum(x.tokens - x.with_output for x in c)}" for c in cols) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", type=Path, default=None,
                    help="a model directory whose tokenizer to use (default: the tiny tokenizer)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(table(a.model_dir, a.seed))


if __name__ == "__main__":
    main()
