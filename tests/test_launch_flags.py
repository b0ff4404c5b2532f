"""One flag list starts every role: the launch-flag tables match the roles' real parsers, every role
accepts the others' flags, `glmserve serve` routes SGLang's launch line, and every --help is complete."""

from __future__ import annotations

import argparse

import pytest

from common.serving import launch_flags
from common.tools import cli, launch, roles
from decode_worker.server import build_arg_parser as decode_parser
from gateway.config import build_arg_parser as gateway_parser
from prefill_worker.server import build_arg_parser as prefill_parser

PARSERS = {"gateway": gateway_parser, "prefill": prefill_parser, "decode": decode_parser}
SGLANG_LINE = ["--model-path", "/m", "--tp-size", "8", "--tool-call-parser", "glm45", "--reasoning-parser", "glm45",
               "--speculative-algorithm", "EAGLE", "--speculative-num-steps", "3", "--speculative-eagle-topk", "1",
               "--speculative-num-draft-tokens", "4", "--mem-fraction-static", "0.9", "--served-model-name",
               "glm-4.6-fp8", "--enable-custom-logit-processor", "--host", "0.0.0.0", "--port", "30000",
               "--enable-metrics", "--log-level", "debug"]


@pytest.mark.parametrize("role", sorted(PARSERS))
def test_the_tables_are_the_roles_own_flags(role):
    assert launch_flags.parser_flags(PARSERS[role]()) == dict(launch_flags.OWN[role])


@pytest.mark.parametrize("role", sorted(PARSERS))
def test_every_role_parses_the_sglang_launch_line(role):
    argv = SGLANG_LINE + (["--prefill", "p:1", "--decode", "d:1"] if role == "gateway" else [])
    ns = PARSERS[role]().parse_args(argv)
    assert ns.model_path == "/m" and ns.port == 30000 and ns.enable_custom_logit_processor
    given = launch_flags.foreign_flags_given(ns)
    if role == "gateway":
        assert "--tp-size" in given and "--speculative-algorithm" in given and "--tool-call-parser" not in given
    else:
        assert "--tool-call-parser" in given and "--served-model-name" in given and "--tp-size" not in given


def _parsers() -> dict[str, argparse.ArgumentParser]:
    roles = {k: f() for k, f in PARSERS.items()}
    return {**roles, "serve": launch.build_arg_parser("glmserve serve", roles), "top": cli.build_parser()}


@pytest.mark.parametrize("name", ["gateway", "prefill", "decode", "serve", "top"])
def test_help_names_glmserve_and_describes_every_option(name):
    p = _parsers()[name]
    assert p.prog.startswith("glmserve") and p.description
    text = p.format_help()
    assert "python -m" not in text
    for action in p._actions:
        assert action.help, f"{name}: {action.option_strings or action.dest} has no help"
        if action.option_strings and action.default is not None and action.default is not False \
                and action.default != argparse.SUPPRESS:
            assert "default" in p._get_formatter()._get_help_string(action), action.option_strings


def test_serve_help_shows_each_role_flags_text_and_default():
    text = " ".join(_parsers()["serve"].format_help().split())
    assert "--request-timeout VALUE seconds a request may take in all [the gateway] (default: 600.0)" in text
    assert "--mem-fraction-static VALUE fraction of GPU memory" in text and "[both workers] (default: 0.85)" in text
    assert "[the prefill workers] (default: 8192)" in text
    assert [roles.role_parser(r).prog for r in ("gateway", "decode")] == ["glmserve gateway", "glmserve decode"]


def test_serve_routes_each_flag_to_the_roles_that_use_it():
    argv = list(SGLANG_LINE)
    own = {"--model-path": True, "--host": True, "--port": True}
    _, passed = launch_flags.split_flags(argv, own)
    routed = launch.route_flags(passed)
    assert routed["gateway"] == ["--tool-call-parser", "glm45", "--reasoning-parser", "glm45", "--served-model-name",
                                 "glm-4.6-fp8", "--enable-metrics", "--enable-custom-logit-processor",
                                 "--log-level", "debug"]
    assert routed["worker"] == ["--tp-size", "8", "--speculative-algorithm", "EAGLE", "--speculative-num-steps", "3",
                                "--speculative-eagle-topk", "1", "--speculative-num-draft-tokens", "4",
                                "--mem-fraction-static", "0.9", "--enable-custom-logit-processor",
                                "--log-level", "debug"]
    assert launch.route_flags(["--chunked-prefill-size", "64", "--max-running-requests", "2"]) == {
        "gateway": [], "worker": [], "prefill": ["--chunked-prefill-size", "64"],
        "decode": ["--max-running-requests", "2"]}
    # SGLang's --disable-radix-cache: both workers drop their caches, the gateway routes by load
    assert launch.route_flags(["--disable-radix-cache"]) == {
        "gateway": ["--disable-radix-cache"], "worker": ["--disable-radix-cache"], "prefill": [], "decode": []}
    with pytest.raises(ValueError, match="unrecognized arguments: --bogus"):
        launch.route_flags(["--bogus", "1"])
    # the launcher's own parser knows the whole line (a typo fails before any process starts)
    launch.build_arg_parser("glmserve serve").parse_args(SGLANG_LINE)


def test_the_launcher_refuses_tls_it_could_not_check(capsys):
    with pytest.raises(SystemExit) as ei:
        launch.main(["--model-path", "/m", "--ssl-certfile", "c.pem", "--ssl-keyfile", "k.pem"], "glmserve serve")
    assert ei.value.code == 2
    assert "is served by `glmserve gateway`; glmserve serve waits for its gateway over plaintext" in \
        capsys.readouterr().err


def test_sglang_switches_with_no_effect_are_reported_and_passed_to_no_role(capsys):
    # (the TLS refusal stops the launcher after the flags are routed and before any process starts)
    with pytest.raises(SystemExit):
        launch.main(["--model-path", "/m", "--trust-remote-code", "--enable-cache-report", "--ssl-certfile", "c.pem",
                     "--ssl-keyfile", "k.pem"], "glmserve serve")
    out = capsys.readouterr().out
    assert "glmserve serve: --trust-remote-code accepted, no effect here: GLM-4.x configs are native" in out
    assert "--enable-cache-report accepted, no effect here" in out and "--disable-shared-experts-fusion" not in out
    parser = launch.build_arg_parser("glmserve serve")
    assert "SGLang flags with no effect here" in parser.format_help()
    own = launch.own_flags(parser)
    _, passed = launch_flags.split_flags([*SGLANG_LINE, *launch_flags.NO_EFFECT], own)
    assert launch.route_flags(passed) == launch.route_flags(launch_flags.split_flags(list(SGLANG_LINE), own)[1])


def test_free_ports_are_distinct_bindable_and_outside_the_ephemeral_range() -> None:
    import socket

    from common.tools import launch

    ports = launch.free_ports(8)
    assert len(set(ports)) == 8
    low = launch._ephemeral_low()
    if low is not None and low > 12000:  # where the kernel says which ports connections take
        assert all(10000 <= p < low for p in ports), (ports, low)
    socks = [socket.socket() for _ in ports]
    try:
        for s, p in zip(socks, ports):
            s.bind(("127.0.0.1", p))  # each still free, all at once
    finally:
        for s in socks:
            s.close()
