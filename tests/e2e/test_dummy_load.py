"""--load-format dummy end to end: a model directory with config.json and tokenizer files but no
weights; a TP 2 prefill worker and a TP 1 decode worker draw the same weights (their pairing
fingerprints agree, and the TP 2 shards are slices of the TP 1 weights), so greedy output through
the gateway equals `glmserve generate --load-format dummy` on the same directory."""

from __future__ import annotations

import re
from pathlib import Path

from tokenizers import Tokenizer

from common.tools.generate import main as generate_main
from common.tools.tiny_model import make_tiny_model
from protos import worker_pb2
from tests.e2e.conftest import gateway, generate, worker_stub

PROMPT = "[gMASK]<sop><|user|>\nHello there<|assistant|>"


def test_dummy_weights_serve_what_generate_prints(launch, tmp_path: Path, capsys) -> None:
    model = make_tiny_model(tmp_path / "config_only", weights=False)
    assert not list(model.glob("*.safetensors"))
    cluster = launch(model, extra_worker_args=["--load-format", "dummy"],
                     extra_prefill_args=["--tp-size", "2"])
    assert generate_main(["--model-path", str(model), "--load-format", "dummy", "--prompt", PROMPT,
                          "--max-tokens", "12"]) == 0
    want = [int(t) for t in re.search(r"generated: \[([\d, ]*)\]", capsys.readouterr().err).group(1).split(",")]
    ids = Tokenizer.from_file(str(model / "tokenizer.json")).encode(PROMPT, add_special_tokens=False).ids
    got = generate(gateway(cluster), ids, max_tokens=12, temperature=0.0)
    assert got.tokens == want
    prints = {worker_stub(port, role).GetInfo(worker_pb2.InfoRequest(), timeout=5).model_fingerprint
              for role, ports in (("prefill", cluster.prefill_ports), ("decode", cluster.decode_ports))
              for port in ports}
    assert len(prints) == 1
