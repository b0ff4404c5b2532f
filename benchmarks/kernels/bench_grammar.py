"""Structured-output engines on a GLM-sized vocabulary: xgrammar against llguidance.

    python3 -m benchmarks.kernels.bench_grammar [--vocab 151552] [--tokens 48] [--model-path DIR]

CPU part (always): on a byte-level BPE vocabulary of `--vocab` entries (the model directory's
tokenizer.json with --model-path, else a synthetic one built here: the 256 byte symbols, English-like
words with and without a leading space and capitalised, numbers, punctuation runs, whitespace runs,
code keywords, CJK characters and pairs, GLM's special tokens, padded to the lm_head size), for each
backend: the one-off start-up (tokenizer tables), then for every grammar of the corpus (JSON schemas,
regexes, EBNF) the cold compile time and, along a random walk of up to `--tokens` allowed tokens, the
time of one mask fill (common.grammar.state.GrammarState.fill: the backend's fill plus the stop-id
fix-up) and of one token advance. Medians and p99 over all steps of the corpus.

GPU part (when CUDA is there): the mask application (common.ops.apply_token_bitmask, Triton) on
[B, V] bf16 logits at B = 1, 32, 64 (CUDA-graph replays, plus the pinned host->device copy of the
bitmask), and the whole per-step grammar cost = one step's host fills of B requests under a JSON
schema (`fill_states`, the call the decode step makes; measured on the CPU part's
vocabulary) + copy + kernel, as a fraction of the decode step (`--step-us`, default: the graphed 4-layer
GLM-4.5-Air-shaped decode step of docs/performance.md §3; a full-depth model's step is longer, so
the fraction there is smaller; the decode step also runs its fills while the forward is still on the
GPU, so only what outlasts the forward shows). With OUT set, the tables also go to $OUT/bench_grammar.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common.grammar.backend import GrammarBackend
from common.grammar.factory import make_backend
from common.grammar.state import GrammarState, fill_states
from common.grammar.vocab import GrammarVocab, byte_level_alphabet
from common.serving.sampling_params import Grammar
from common.tools.tiny_tokenizer import SPECIAL_TOKENS, STOP_TOKENS

TOOL_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "enum": ["get_weather", "search", "book_flight"]},
        "arguments": {"type": "object", "properties": {
            "city": {"type": "string"}, "date": {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$"},
            "passengers": {"type": "integer", "minimum": 1, "maximum": 9},
            "class": {"enum": ["economy", "business"]}},
            "required": ["city", "date"]},
    },
    "required": ["name", "arguments"],
}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer"}, "email": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "address": {"type": "object", "properties": {"street": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["street"]},
        "active": {"type": "boolean"}, "score": {"type": "number"},
    },
    "required": ["name", "age", "tags", "address"],
}
WIDE = {"type": "object", "properties": {f"field_{i}": {"type": ["string", "integer", "null"]} for i in range(40)},
        "required": [f"field_{i}" for i in range(0, 40, 4)]}
NESTED = {"type": "object", "properties": {"items": {"type": "array", "items": {
    "type": "object", "properties": {"id": {"type": "integer"}, "children": {"type": "array", "items": {
        "type": "object", "properties": {"label": {"type": "string"}, "weight": {"type": "number"}}}}}}}}}
CORPUS: list[tuple[str, Grammar]] = [
    ("json: enum", Grammar("json_schema", json.dumps({"type": "object", "properties": {
        "sentiment": {"enum": ["positive", "negative", "neutral"]}}, "required": ["sentiment"]}))),
    ("json: tool call", Grammar("json_schema", json.dumps(TOOL_SCHEMA))),
    ("json: person", Grammar("json_schema", json.dumps(PERSON))),
    ("json: 40 fields", Grammar("json_schema", json.dumps(WIDE))),
    ("json: nested arrays", Grammar("json_schema", json.dumps(NESTED))),
    ("json_object", Grammar("json_object")),
    ("regex: code", Grammar("regex", r"[0-9]{3}-[a-z]{2}")),
    ("regex: date", Grammar("regex", r"(19|20)\d{2}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])")),
    ("regex: email", Grammar("regex", r"[a-z0-9._%+-]{1,20}@[a-z0-9-]{1,20}\.(com|org|net|io)")),
    ("regex: uuid", Grammar("regex", r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")),
    ("regex: sentence", Grammar("regex", r"[A-Z][a-z]{1,10}( [a-z]{1,10}){3,12}[.!?]")),
    ("ebnf: arithmetic", Grammar("ebnf", 'root ::= expr\nexpr ::= term (("+" | "-") term)*\n'
                                         'term ::= factor (("*" | "/") factor)*\n'
                                         'factor ::= [0-9]+ | "(" expr ")"')),
    ("ebnf: key=value list", Grammar("ebnf", 'root ::= pair ("; " pair)*\npair ::= [a-z_]+ "=" value\n'
                                             'value ::= [0-9]+ | "\\"" [a-zA-Z ]* "\\""')),
    ("ebnf: sql select", Grammar("ebnf", 'root ::= "SELECT " cols " FROM " name (" WHERE " cond)? ";"\n'
                                         'cols ::= "*" | name (", " name)*\nname ::= [a-z_]+\n'
                                         'cond ::= name (" = " | " > " | " < ") [0-9]+')),
]
DEFAULT_STEP_US = {1: 1423.0, 32: 5288.0, 64: 6032.0}  # docs/performance.md §3, graphed 4-layer Air step


# ----------------------------------------------------------------------------------- vocabulary
def synthetic_model_dir(out: Path, vocab_size: int, seed: int = 0) -> Path:
    """A model directory with a synthetic byte-level BPE tokenizer.json of `vocab_size` ids (the last 64
    padding, GLM's special tokens before them) and a generation_config.json naming the stop ids."""
    rng = random.Random(seed)
    sym = byte_level_alphabet()
    enc = lambda text: "".join(sym[b] for b in text.encode("utf-8"))
    n_special = len(SPECIAL_TOKENS)
    target = vocab_size - 64 - n_special
    pieces: dict[str, None] = dict.fromkeys(sym)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    weights = [12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8, 2.4, 2.4, 2.2, 2.0, 2.0, 1.9,
               1.5, 1.0, 0.8, 0.2, 0.2, 0.1, 0.1]
    for n in range(1000):
        pieces.setdefault(enc(str(n)))
        pieces.setdefault(enc(" " + str(n)))
    punct = '{}[]":,.;!?()<>=+-*/\'_#@$%&|~`\\'
    for a in punct:
        for b in punct:
            pieces.setdefault(enc(a + b))
            pieces.setdefault(enc(" " + a + b))
    for n in range(1, 33):
        for ws in (" " * n, "\n" + " " * (n - 1), "\t" * min(n, 8), "\n" * min(n, 4)):
            pieces.setdefault(enc(ws))
    for kw in ("def", "class", "return", "import", "from", "self", "None", "True", "False", "function", "const",
               "let", "var", "public", "static", "void", "int", "string", "null", "true", "false", "SELECT",
               "WHERE", "FROM"):
        for form in (kw, " " + kw, "." + kw, "(" + kw):
            pieces.setdefault(enc(form))
    cjk = [chr(c) for c in range(0x4E00, 0x4E00 + 12000)]
    for ch in cjk:
        pieces.setdefault(enc(ch))
    while len(pieces) < target - 3000:
        length = min(12, max(1, int(rng.expovariate(1 / 4.5)) + 1))
        word = "".join(rng.choices(letters, weights, k=length))
        form = rng.random()
        if form < 0.45:
            word = " " + word
        elif form < 0.55:
            word = " " + word.capitalize()
        elif form < 0.6:
            word = word.capitalize()
        pieces.setdefault(enc(word))
    while len(pieces) < target:
        pieces.setdefault(enc("".join(rng.choices(cjk[:3000], k=2))))
    vocab = {p: i for i, p in enumerate(list(pieces)[:target])}
    added = [{"id": target + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, t in enumerate(SPECIAL_TOKENS)]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    spec = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": byte_level, "post_processor": None, "decoder": byte_level,
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": False, "vocab": vocab, "merges": []}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    stops = [target + SPECIAL_TOKENS.index(t) for t in STOP_TOKENS]
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": stops}), encoding="utf-8")
    return out


# ----------------------------------------------------------------------------------- measuring
def _walk(backend: GrammarBackend, grammar: Grammar, steps: int, rng: random.Random) -> tuple[float, list[float], list[float]]:
    """(compile s, fill seconds per step, advance seconds per step) along a random walk of allowed tokens."""
    backend._cache.clear()
    t0 = time.perf_counter()
    compiled = backend.compile(grammar)
    compile_s = time.perf_counter() - t0
    state = GrammarState.create(backend, compiled, backend.vocab.end_ids, False, None)
    words = (backend.vocab_size + 31) // 32
    bitmask = torch.full((1, words), -1, dtype=torch.int32)
    bits = torch.arange(32, dtype=torch.int32)
    out: list[int] = []
    fills, advances = [], []
    for _ in range(steps):
        bitmask.fill_(-1)
        t0 = time.perf_counter()
        state.fill(bitmask, 0, out)
        fills.append(time.perf_counter() - t0)
        allowed = ((bitmask[0, :, None] >> bits) & 1).reshape(-1)[:backend.vocab_size].nonzero().reshape(-1).tolist()
        ends = [t for t in allowed if t in backend.vocab.end_ids]
        text = [t for t in allowed if t not in backend.vocab.end_ids]
        if not text or (ends and rng.random() < 0.1):
            break
        out.append(rng.choice(text))
        t0 = time.perf_counter()
        state.advance(out)
        advances.append(time.perf_counter() - t0)
    return compile_s, fills, advances


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def cpu_part(model_dir: Path, vocab_size: int, steps: int) -> tuple[list[str], dict[str, float]]:
    lines = []
    fill_p50 = {}
    vocab = GrammarVocab.from_model_dir(model_dir, vocab_size)
    lines.append(f"vocabulary: {vocab.vocab_size} ids ({vocab.kind}), end ids {list(vocab.end_ids)}")
    for name in ("xgrammar", "llguidance"):
        t0 = time.perf_counter()
        backend = make_backend(name, vocab)
        init = time.perf_counter() - t0
        rng = random.Random(1)
        rows, fills, advances, compiles = [], [], [], []
        for label, grammar in CORPUS:
            c, f, a = _walk(backend, grammar, steps, rng)
            compiles.append(c)
            fills += f
            advances += a
            rows.append(f"| {label} | {c * 1e3:.1f} | {len(f)} | {statistics.median(f) * 1e6:.0f} | "
                        f"{max(f) * 1e6:.0f} | {statistics.median(a) * 1e6 if a else 0:.0f} |")
        backend.close()
        fill_p50[name] = statistics.median(fills)
        summary = (f"### {name}: start-up {init:.2f} s; corpus compile total {sum(compiles) * 1e3:.0f} ms "
                   f"(median {statistics.median(compiles) * 1e3:.1f} ms, max {max(compiles) * 1e3:.0f} ms); "
                   f"mask fill median {statistics.median(fills) * 1e6:.0f} µs, p99 {_pct(fills, 0.99) * 1e6:.0f} µs; "
                   f"advance median {statistics.median(advances) * 1e6:.0f} µs")
        lines += ["", summary, "",
                  "| grammar | compile ms | steps | fill median µs | fill max µs | advance median µs |",
                  "|---|---|---|---|---|---|", *rows]
    return lines, fill_p50


def batched_fills(model_dir: Path, vocab_size: int, name: str, sizes: tuple[int, ...] = (1, 32, 64),
                  reps: int = 30) -> dict[int, float]:
    """Seconds of one decode step's host fills with B requests under backend `name` (a JSON schema
    each, each some tokens into its answer): `fill_states`, the call the decode step makes."""
    backend = make_backend(name, GrammarVocab.from_model_dir(model_dir, vocab_size))
    grammar = next(g for lbl, g in CORPUS if lbl == "json: tool call")
    compiled = backend.compile(grammar)
    words = (vocab_size + 31) // 32
    bits = torch.arange(32, dtype=torch.int32)
    rng = random.Random(2)
    out: dict[int, float] = {}
    for b in sizes:
        bitmask = torch.full((b, words), -1, dtype=torch.int32)
        work = []
        for i in range(b):
            state = GrammarState.create(backend, compiled, backend.vocab.end_ids, False, None)
            hist: list[int] = []
            for _ in range(rng.randrange(1, 12)):  # each request somewhere else in its answer
                state.fill(bitmask, i, hist)
                allowed = ((bitmask[i, :, None] >> bits) & 1).reshape(-1)[:vocab_size].nonzero().reshape(-1).tolist()
                text = [t for t in allowed if t not in backend.vocab.end_ids]
                if not text:
                    break
                hist.append(rng.choice(text))
                state.advance(hist)
            work.append((state, [(i, hist)]))
        times = []
        for _ in range(reps):
            bitmask.fill_(-1)
            t0 = time.perf_counter()
            fill_states(bitmask, work)
            times.append(time.perf_counter() - t0)
        out[b] = statistics.median(times)
    backend.close()
    return out


def gpu_part(vocab_size: int, fill_s: dict[int, float], step_us: dict[int, float]) -> list[str]:
    from benchmarks import measure
    from common.ops import apply_token_bitmask

    info = measure.device_info()
    lines = ["", f"GPU {info['gpu']} | torch {info['torch']} | triton {info['triton']}", "",
             "| B | apply kernel µs | H2D copy µs | host fills µs (xgrammar) | total µs | decode step µs | fraction |",
             "|---|---|---|---|---|---|---|"]
    words = (vocab_size + 31) // 32
    for b in (1, 32, 64):
        logits = [torch.randn(b, vocab_size, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
        masks = [torch.randint(-2**31, 2**31 - 1, (b, words), device="cuda", dtype=torch.int64).to(torch.int32)
                 for _ in range(4)]
        t_apply = measure.time_graph([lambda x=x, m=m: apply_token_bitmask(x, m) for x, m in zip(logits, masks)])
        host = torch.empty((b, words), dtype=torch.int32, pin_memory=True)
        t_copy = measure.median_event_us(lambda h=host, m=masks[0]: m.copy_(h, non_blocking=True), 50)
        fills = fill_s[b] * 1e6
        total = t_apply + t_copy + fills
        step = step_us.get(b, float("nan"))
        lines.append(f"| {b} | {t_apply:.1f} | {t_copy:.1f} | {fills:.0f} | {total:.0f} | {step:.0f} | "
                     f"{total / step:.3f} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=151552, help="lm_head rows (GLM-4.5: 151552)")
    p.add_argument("--tokens", type=int, default=48, help="steps of each random walk")
    p.add_argument("--model-path", default=None, help="a model directory with tokenizer.json (default: synthetic)")
    p.add_argument("--step-us", default=None, help="decode step µs per batch size, e.g. 1=1423,32=5288,64=6032")
    args = p.parse_args()
    head = (f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} torch threads), "
            f"python {platform.python_version()}, torch {torch.__version__}")
    print(head, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model_path:
            model_dir, source = Path(args.model_path), f"tokenizer of {args.model_path}"
        else:
            t0 = time.perf_counter()
            model_dir = synthetic_model_dir(Path(tmp) / "vocab", args.vocab)
            source = f"synthetic byte-level BPE vocabulary (built in {time.perf_counter() - t0:.1f} s)"
        lines, _ = cpu_part(model_dir, args.vocab, args.tokens)
        fills = {name: batched_fills(model_dir, args.vocab, name) for name in ("xgrammar", "llguidance")}
        fill_s = fills["xgrammar"]
        lines += [""] + [f"One decode step's host fills with {name}, B requests under a JSON schema (`fill_states`): "
                         + ", ".join(f"B = {b}: {v * 1e6:.0f} µs" for b, v in f.items()) for name, f in fills.items()]
    lines = [head, source, *lines]
    if torch.cuda.is_available():
        steps = dict(DEFAULT_STEP_US)
        if args.step_us:
            steps = {int(k): float(v) for k, v in (kv.split("=") for kv in args.step_us.split(","))}
        lines += gpu_part(args.vocab, fill_s, steps)
    text = "\n".join(lines)
    print("\n".join(lines[2:]))
    from benchmarks import measure

    if measure.out_dir() is not None:
        measure.write_out("bench_grammar.md", text)


if __name__ == "__main__":
    main()
