"""GatewayConfig.from_args: SGLang-style flags, repeatable worker addresses, refusals at the edge."""

from __future__ import annotations

import dataclasses

import pytest

from gateway.config import GatewayConfig


def test_from_args_sglang_flags() -> None:
    c = GatewayConfig.from_args([
        "--model-path", "/models/GLM-4.5-Air", "--host", "127.0.0.1", "--port", "30001",
        "--prefill", "p1:1", "--prefill", "p2:1", "--decode", "d1:1", "--tool-call-parser", "glm47",
        "--reasoning-parser", "glm45", "--enable-custom-logit-processor", "--default-thinking-budget", "256",
        "--metrics-port", "9100", "--request-timeout", "30"])
    assert c.prefill == ("p1:1", "p2:1") and c.decode == ("d1:1",)
    assert (c.tool_call_parser, c.reasoning_parser) == ("glm47", "glm45")
    assert c.enable_custom_logit_processor and c.default_thinking_budget == 256
    assert c.metrics_port == 9100 and c.request_timeout == 30.0 and c.listen == "127.0.0.1:30001"
    assert c.model_name == "GLM-4.5-Air" and c.served_model_name is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.port = 1  # type: ignore[misc]


def test_defaults_and_none_parsers() -> None:
    c = GatewayConfig.from_args(["--model-path", "/m", "--prefill", "p:1", "--decode", "d:1",
                                 "--tool-call-parser", "none", "--served-model-name", "glm"])
    assert c.tool_call_parser is None and c.reasoning_parser is None and c.model_name == "glm"
    assert c.metrics_port is None and not c.enable_custom_logit_processor
    assert (c.port, c.http_port) == (30010, 30000)  # gRPC beside SGLang's OpenAI port


def test_worker_flags_of_a_shared_launch_line_are_accepted_and_not_used() -> None:
    from common.serving.launch_flags import foreign_flags_given
    from gateway.config import build_arg_parser

    argv = ["--model-path", "/m", "--prefill", "p:1", "--decode", "d:1", "--tp-size", "8",
            "--speculative-algorithm", "EAGLE", "--speculative-num-steps", "3", "--speculative-eagle-topk", "1",
            "--speculative-num-draft-tokens", "4", "--mem-fraction-static", "0.9", "--disable-cuda-graph"]
    ns = build_arg_parser().parse_args(argv)
    assert GatewayConfig.from_namespace(ns).prefill == ("p:1",)
    assert foreign_flags_given(ns) == ["--disable-cuda-graph", "--mem-fraction-static", "--speculative-algorithm",
                                       "--speculative-eagle-topk", "--speculative-num-draft-tokens",
                                       "--speculative-num-steps", "--tp-size"]


@pytest.mark.parametrize("argv,message", [
    (["--model-path", "/m", "--decode", "d:1"], "at least one --prefill and one --decode"),
    (["--model-path", "/m", "--prefill", "p:1", "--decode", "d:1", "--tool-call-parser", "glm99"],
     "choose from glm45, glm47 or none"),
    (["--model-path", "/m", "--prefill", "p:1", "--decode", "d:1", "--default-thinking-budget", "-1"],
     "--default-thinking-budget must be >= 0"),
    (["--model-path", "/m", "--prefill", "p:1", "--decode", "d:1", "--request-timeout", "0"],
     "--request-timeout must be > 0"),
])
def test_bad_flags_exit_with_a_usage_error(argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as ei:
        GatewayConfig.from_args(argv)
    assert ei.value.code == 2 and message in capsys.readouterr().err
