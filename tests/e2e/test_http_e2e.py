"""Real processes on the tiny model, started by the real `glmserve serve` command: the OpenAI HTTP API
gives the same greedy tokens as gRPC and the single-process reference, a disconnected stream frees
the workers' pages, and the README's calling examples run against the launch line (its host:port
pointed at this cluster's free ports: the only change made to them)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import openai
import pytest

from common.tools.launch import free_ports
from gateway.tokenizer import Tokenizer
from protos import gateway_pb2, gateway_pb2_grpc
from tests.e2e.conftest import load_of, wait_pages_free

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
NODE_CACHE = Path.home() / ".cache" / "glmserve" / "node-example"


@dataclass
class Served:
    http: int
    grpc: int
    proc: subprocess.Popen
    log_dir: Path

    def ports(self, role: str) -> list[int]:
        text = (self.log_dir / f"{role}0.log").read_text()
        return [int(m) for m in re.findall(r"serving on [\d.]+:(\d+)", text)]


@pytest.fixture(scope="module")
def served(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    http, grpc_port = free_ports(2)
    log_dir = tmp_path_factory.mktemp("serve_logs")
    proc = subprocess.Popen(
        [sys.executable, "-m", "common.tools.cli", "serve", "--model-path", str(tiny_model_dir),
         "--port", str(http), "--grpc-port", str(grpc_port), "--enable-custom-logit-processor",
         "--served-model-name", "glm-tiny", "--log-dir", str(log_dir), "--log-level", "debug",
         "--chunked-prefill-size", "32"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.monotonic() + 120
    for line in proc.stdout:  # the launcher prints "ready" once every process serves
        lines.append(line)
        if "ready. OpenAI API" in line or time.monotonic() > deadline:
            break
    assert "ready. OpenAI API" in lines[-1], "".join(lines)[-4000:]
    s = Served(http, grpc_port, proc, log_dir)
    yield s
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    proc.stdout.close()


def _chat_grpc(stub, text: str, **sampling) -> dict:
    req = gateway_pb2.ChatRequest(messages=[gateway_pb2.ChatMessage(role="user", content=text)],
                                  sampling=gateway_pb2.SamplingParams(**sampling))
    out = {"reasoning": "", "content": ""}
    for m in stub.Chat(req, timeout=60):
        out["reasoning"] += m.delta.reasoning_content
        out["content"] += m.delta.content
        if m.HasField("usage"):
            out["completion_tokens"] = m.usage.completion_tokens
    return out


def test_http_equals_grpc_equals_reference_token_for_token(served, tiny_model_dir, reference):
    tok = Tokenizer.from_dir(tiny_model_dir)
    stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(f"127.0.0.1:{served.grpc}"))
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{served.http}/v1", api_key="EMPTY", max_retries=0)
    prompt = [11, 22, 33, 44, 55, 66, 77]
    want = reference.greedy(prompt, 20)
    g = [m for m in stub.Generate(gateway_pb2.GenerateRequest(
        tokens=gateway_pb2.TokenIds(ids=prompt), skip_special_tokens=False,
        sampling=gateway_pb2.SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)), timeout=60)]
    grpc_ids = [t for m in g for t in m.token_ids]
    assert grpc_ids == want
    h = client.completions.create(model="glm-tiny", prompt=prompt, max_tokens=20, temperature=0, logprobs=0,
                                  extra_body={"ignore_eos": True, "skip_special_tokens": False})
    assert h.choices[0].logprobs.tokens == [tok.decode([t]) for t in want]
    assert h.choices[0].text == "".join(m.text for m in g) and h.usage.completion_tokens == 20
    # chat: the same answer through both surfaces (template, parsers, greedy sampling)
    for text in ("Hello there", "What is the weather in Paris?"):
        rpc = _chat_grpc(stub, text, temperature=0, max_tokens=24)
        r = client.chat.completions.create(model="glm-tiny", messages=[{"role": "user", "content": text}],
                                           temperature=0, max_tokens=24)
        m = r.choices[0].message
        assert (m.reasoning_content or "", m.content or "") == (rpc["reasoning"], rpc["content"])
        assert r.usage.completion_tokens == rpc["completion_tokens"]
        streamed = client.chat.completions.create(model="glm-tiny", messages=[{"role": "user", "content": text}],
                                                  temperature=0, max_tokens=24, stream=True)
        parts = [(c.choices[0].delta.reasoning_content or "", c.choices[0].delta.content or "") for c in streamed]
        assert ("".join(p[0] for p in parts), "".join(p[1] for p in parts)) == (rpc["reasoning"], rpc["content"])


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}


def test_required_and_named_tool_choice_are_enforced_while_decoding(served):
    """The random model never calls a tool by itself; with tool_choice it must open the call (the
    tool-call grammar may spell the name with any tokens, so the text is compared)."""
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{served.http}/v1", api_key="EMPTY", max_retries=0)
    for choice, head in (("auto", None), ("required", "<tool_call>"),
                         ({"type": "function", "function": {"name": "get_weather"}}, "<tool_call>get_weather")):
        for seed in (1, 2):
            r = client.chat.completions.create(
                model="glm-tiny", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER],
                tool_choice=choice, max_tokens=48, temperature=1.0, seed=seed, logprobs=True,
                extra_body={"chat_template_kwargs": {"enable_thinking": False}})
            tokens = [t.token for t in r.choices[0].logprobs.content]
            answer = tokens[1:] if tokens[0] == "\n" else tokens
            if head is None:
                assert answer[0] != "<tool_call>"  # the free model: no call (these seeds)
            else:
                assert "".join(answer).startswith(head), tokens


def test_disconnect_mid_stream_frees_both_workers(served):
    prefill_port, = served.ports("prefill")
    decode_port, = served.ports("decode")
    before = {("prefill", prefill_port): load_of(prefill_port, "prefill").free_pages,
              ("decode", decode_port): load_of(decode_port, "decode").free_pages}
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{served.http}/v1", api_key="EMPTY", max_retries=0)
    stream = client.chat.completions.create(model="glm-tiny", messages=[{"role": "user", "content": "go on " * 40}],
                                            max_tokens=600, stream=True, extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.close()
    assert wait_pages_free(None, before) == before, "KV pages leaked after the client left"
    assert load_of(decode_port, "decode").running == 0
    log = (served.log_dir / "gateway.log").read_text()
    assert re.search(r"request chatcmpl-\w+ cancelled", log)
    assert re.search(r"request chatcmpl-\w+ finished: prompt \d+ tokens \(0 cached\), output \d+ tokens", log)


def _block(marker: str) -> str:
    """The fenced block after `<!-- readme-test: marker -->` in README.md."""
    m = re.search(rf"<!-- readme-test: {marker} -->\n```\w+\n(.*?)```", README, re.DOTALL)
    assert m, marker
    return m.group(1)


def _pointed(code: str, served: Served) -> str:
    return (code.replace("127.0.0.1:30000", f"127.0.0.1:{served.http}")
            .replace("localhost:30010", f"localhost:{served.grpc}").replace("127.0.0.1:30010", f"127.0.0.1:{served.grpc}"))


def _run(args: list[str], served: Served, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    r = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env, check=False, **kw)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def test_readme_openai_and_curl_examples(served):
    out = _run([sys.executable, "-c", _pointed(_block("openai"), served)], served, cwd="/").stdout
    assert "CompletionUsage(" in out and "completion_tokens=" in out
    sse = _run(["bash", "-c", _pointed(_block("curl"), served)], served).stdout
    events = [e for e in sse.split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_readme_grpc_examples(served):
    from tests.service.test_grpcurl import GRPCURL

    if GRPCURL is None:
        pytest.skip("grpcurl binary not installed (dev extra)")
    code = _pointed(_block("grpcurl"), served).replace("grpcurl ", f"{GRPCURL} ")
    out = _run(["bash", "-c", code], served).stdout
    assert "glmserve.v1.Gateway" in out and '"finish_reason": "' in out
    _run([sys.executable, "-c", _pointed(_block("grpc-python"), served)], served, cwd="/")


def test_readme_node_example_from_another_directory(served, tmp_path):
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("Node.js is not installed (the example needs node and npm)")
    if not (NODE_CACHE / "node_modules" / "@grpc" / "grpc-js").is_dir():
        NODE_CACHE.mkdir(parents=True, exist_ok=True)
        _run(["bash", "-c", _block("node").splitlines()[0] + " --no-audit --no-fund --silent"], served,
             cwd=NODE_CACHE)
    run_line = _block("node").splitlines()[1].replace("/path/to/glmserve", str(REPO))
    out = _run(["bash", "-c", _pointed(run_line, served)], served, cwd=NODE_CACHE).stdout
    assert '"finish_reason": "' in out and '"usage"' in out


def test_serve_reports_a_child_that_fails_to_start_with_its_own_message(tiny_model_dir, tmp_path):
    r = subprocess.run([sys.executable, "-m", "common.tools.cli", "serve", "--model-path", str(tiny_model_dir),
                        "--port", "0", "--grpc-port", "0", "--page-size", "0", "--log-dir", str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 1
    assert re.search(r"(prefill|decode)0 exited with status 2 \(full log: .*\.log\); its last lines:", r.stderr)
    assert "error: --page-size must be >= 1, got 0" in r.stderr and "Traceback" not in r.stderr
    assert (tmp_path / "gateway.log").exists() and (tmp_path / "prefill0.log").read_text()
