"""Single-process reference generation: no servers, no batching, one request at a time.

It is the oracle the disaggregated path must match token for token under greedy decoding (and the
`glmserve generate` command). Deliberately plain: prompt forward, then one token per forward.
`--tp-size N` runs the same loop on N tensor-parallel ranks (gloo on the CPU), so TP N can be
compared with TP 1 from the command line.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from common.forward.batch import ForwardBatch, SeqSpec
from common.runtime.distributed import BACKENDS, TPConfig
from common.runtime.runner import ModelRunner, RunnerSpec
from common.sampling.logit_processors import RowContext
from common.sampling.token_sampler import SpecialIds, TokenSampler
from common.serving.launch_flags import HelpFormatter
from common.serving.sampling_params import SamplingParams
from common.worker.ranks import start_ranks

DEFAULT_TINY_DIR = Path(os.environ.get("GLMSERVE_TINY_DIR", "~/.cache/glmserve/tiny-glm45")).expanduser()


@torch.inference_mode()
def reference_generate(runner: ModelRunner, sampler: TokenSampler, prompt_ids: Sequence[int],
                       params: SamplingParams) -> list[int]:
    """Generate until a stop id, eos (unless ignore_eos) or max_tokens; returns output ids."""
    max_tokens = params.max_tokens or 16
    total = len(prompt_ids) + max_tokens
    pages = runner.allocator.alloc(-(-total // runner.page_size))
    if pages is None:
        raise RuntimeError("reference_generate: KV pool too small for this request")
    stops = set(params.stop_token_ids) | (set() if params.ignore_eos else set(sampler.ids.eos))
    out: list[int] = []
    try:
        ids, start = list(prompt_ids), 0
        while True:
            spec = SeqSpec(ids[start:], range(start, len(ids)), seq_len=len(ids), pages=pages)
            logits, _ = runner.forward(ForwardBatch.build([spec], runner.page_size, runner.device))
            tok = sampler.sample(logits, [RowContext(params, list(prompt_ids), list(out))])[0].token
            out.append(tok)
            if tok in stops or len(out) >= max_tokens:
                return out
            start = len(ids)
            ids.append(tok)
    finally:
        runner.allocator.free(pages)


def ensure_tiny_model(path: Path = DEFAULT_TINY_DIR, template: str = "glm45") -> Path:
    """The built-in default model: built once, then reused."""
    if not (path / "config.json").exists():
        from common.tools.tiny_model import make_tiny_model

        make_tiny_model(path, template=template)
    return path


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="glmserve generate", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model-path", default=None, help="model directory (default: the built-in tiny model)")
    p.add_argument("--prompt", default="[gMASK]<sop><|user|>\nHello, who are you?<|assistant|>",
                   help="raw prompt text (already in chat format)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampling (default: unseeded)")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--tp-size", type=int, default=1, help="tensor-parallel ranks (processes)")
    p.add_argument("--tp-backend", default="auto", choices=BACKENDS,
                   help="auto: NCCL across GPUs, gloo on the CPU or when ranks share a GPU")
    p.add_argument("--base-gpu-id", type=int, default=None, help="GPU of rank 0 (rank r uses base + r)")
    p.add_argument("--load-format", default="auto", choices=("auto", "dummy"),
                   help="dummy: seeded random weights from config.json alone (what a worker with the same flag "
                        "serves)")
    args = p.parse_args(argv)
    model_path = Path(args.model_path) if args.model_path else ensure_tiny_model()
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_path / "tokenizer.json"))
    spec = RunnerSpec(str(model_path), "float32" if args.device == "cpu" else "bfloat16", page_size=16, num_pages=256,
                      load_format=args.load_format)
    ranks = None
    if args.tp_size > 1:
        try:
            tp = TPConfig.resolve(args.tp_size, args.device, args.tp_backend, base_gpu_id=args.base_gpu_id)
        except ValueError as e:
            p.error(str(e))
        runner, ranks = start_ranks(spec, tp, role="generate")
    else:
        runner = spec.build(args.device)
    sampler = TokenSampler(SpecialIds.from_model_dir(str(model_path)))
    ids = tok.encode(args.prompt, add_special_tokens=False).ids
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed)
    try:
        out = reference_generate(runner, sampler, ids, params)
    finally:
        if ranks is not None:
            ranks.stop()
    sys.stdout.write(tok.decode(out, skip_special_tokens=False) + "\n")
    print(f"[{len(ids)} prompt tokens, {len(out)} generated: {out}]", file=sys.stderr)
    return 0
