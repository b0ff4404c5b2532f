"""compose.yaml cannot drift from the CLI: every service command parses with the real parser of
its role, and the deployment keeps its invariants (health checks, GPUs, NCCL env, model volume)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from common.tools.cli import COMMANDS
from common.worker.args import parse_spec

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
SERVICES = {n: s for n, s in COMPOSE["services"].items() if n != "cluster-secret"}  # the serving roles


def parser_for(role: str):
    if role == "gateway":
        from gateway.config import build_arg_parser
    elif role == "prefill":
        from prefill_worker.server import build_arg_parser
    elif role == "decode":
        from decode_worker.server import build_arg_parser
    else:
        raise AssertionError(f"no parser for role {role!r}")
    return build_arg_parser()


def expand(arg: str) -> str:
    """${VAR:-default} -> default (compose interpolation with the variable unset)."""
    if arg.startswith("${") and ":-" in arg:
        return arg[arg.index(":-") + 2 : -1]
    return arg


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_service_command_parses_with_the_real_cli(name):
    cmd = [expand(a) for a in SERVICES[name]["command"]]
    assert cmd[0] == "glmserve" and cmd[1] in COMMANDS, cmd[:2]
    ns = parser_for(cmd[1]).parse_args(cmd[2:])
    assert ns.model_path == "/model"
    if cmd[1] in ("prefill", "decode"):
        spec, _ = parse_spec(ns)  # SGLang's EAGLE rules hold for the configured setting
        assert spec.enabled and (spec.num_steps, spec.eagle_topk, spec.num_draft_tokens) == (3, 1, 4)


def test_workers_agree_on_what_pairing_checks():
    p = parser_for("prefill").parse_args([expand(a) for a in SERVICES["prefill"]["command"][2:]])
    d = parser_for("decode").parse_args([expand(a) for a in SERVICES["decode"]["command"][2:]])
    for field in ("page_size", "speculative_algorithm", "speculative_num_steps",
                  "speculative_eagle_topk", "speculative_num_draft_tokens", "dtype"):
        assert getattr(p, field) == getattr(d, field), field
    assert (p.tp_size, d.tp_size) == (1, 1)  # TP sizes may differ (PREFILL_TP, DECODE_TP); one GPU each by default


def test_gateway_points_at_the_worker_services():
    g = parser_for("gateway").parse_args([expand(a) for a in SERVICES["gateway"]["command"][2:]])
    ports = {n: [expand(a) for a in SERVICES[n]["command"]] for n in ("prefill", "decode")}
    assert g.prefill == [f"prefill:{ports['prefill'][ports['prefill'].index('--port') + 1]}"]
    assert g.decode == [f"decode:{ports['decode'][ports['decode'].index('--port') + 1]}"]


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_health_checks_use_grpc_health(name):
    test = SERVICES[name]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "glmserve", "health"]
    port = [expand(a) for a in SERVICES[name]["command"]]
    assert test[3].endswith(":" + port[port.index("--port") + 1])
    assert test[4].startswith("glmserve.")


@pytest.mark.parametrize("name", ["prefill", "decode"])
def test_workers_reserve_a_gpu_and_keep_nvlink_multicast_off(name):
    svc = SERVICES[name]
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert devices and devices[0]["capabilities"] == ["gpu"]
    env = svc["environment"]
    assert env["NCCL_NVLS_ENABLE"] == "0" and env["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"
    assert env["NVSHMEM_DISABLE_NVLS"] == "1"
    assert any(v.endswith(":/model:ro") for v in svc["volumes"])


def test_workers_read_the_generated_cluster_secret():
    init = COMPOSE["services"]["cluster-secret"]
    assert init["command"][:2] == ["glmserve", "cluster-secret"]
    path = init["command"][2]
    for name in ("prefill", "decode"):
        cmd = SERVICES[name]["command"]
        assert cmd[cmd.index("--cluster-secret-file") + 1] == path
        assert SERVICES[name]["depends_on"]["cluster-secret"]["condition"] == "service_completed_successfully"
    assert "cluster-secret" not in str(SERVICES["gateway"].get("volumes")), "the gateway needs no secret"
