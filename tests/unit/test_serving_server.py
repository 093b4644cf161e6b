"""How `serve` chooses its ingress and inference precision (pure decisions; the integration
tests run both against a real server)."""

from __future__ import annotations

import pytest
from shardtune.data.device import inference_precision
from shardtune.serving.server import direct_ingress_env, resolve_ingress

BF16_CPU = "fpu sse avx512f avx512_bf16"
OLD_CPU = "fpu sse avx2"


def test_auto_ingress_is_direct_only_for_one_local_replica():
    assert resolve_ingress("auto", replicas=1, joined=False) == "direct"
    assert resolve_ingress("auto", replicas=2, joined=False) == "proxy"
    assert resolve_ingress("auto", replicas=1, joined=True) == "proxy"
    assert resolve_ingress("proxy", replicas=1, joined=False) == "proxy"


@pytest.mark.parametrize(
    "replicas,joined,named", [(2, False, "--replicas 2"), (1, True, "--address")]
)
def test_direct_ingress_refused_where_it_cannot_serve(replicas, joined, named):
    with pytest.raises(ValueError, match=named):
        resolve_ingress("direct", replicas=replicas, joined=joined)


def test_direct_ingress_pins_the_replica_port_range_to_the_one_port():
    env = direct_ingress_env(8123)
    lo, hi = (
        int(env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"]),
        int(env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]),
    )
    assert list(range(lo, hi)) == [8123]  # Ray allocates from range(min, max)
    assert (
        env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1" and env["RAY_SERVE_PORT_QUARANTINE_S"] == "0"
    )


def test_inference_precision_follows_the_device():
    auto = dict(on_gpu=False, gpu_bf16=False)
    assert inference_precision("auto", **auto, cpu_flags=BF16_CPU) == "bf16"
    assert inference_precision("auto", **auto, cpu_flags="amx_bf16 avx2") == "bf16"
    assert inference_precision("auto", **auto, cpu_flags=OLD_CPU) == "fp32"
    assert inference_precision("auto", on_gpu=True, gpu_bf16=True, cpu_flags=OLD_CPU) == "bf16"
    assert inference_precision("auto", on_gpu=True, gpu_bf16=False, cpu_flags=BF16_CPU) == "fp32"
    assert inference_precision("fp32", **auto, cpu_flags=BF16_CPU) == "fp32"
    assert inference_precision("bf16", **auto, cpu_flags=OLD_CPU) == "bf16"  # asked for: honoured
    with pytest.raises(ValueError, match="fp8"):
        inference_precision("fp8", **auto, cpu_flags=BF16_CPU)


def test_batches_at_once_share_the_replica_cpus():
    from shardtune.serving.app import ServeSettings

    two = ServeSettings(model="m", num_cpus=2, max_batch_size=8)
    assert (two.batches_at_once, two.torch_threads, two.max_ongoing_requests) == (2, 1, 40)
    one = ServeSettings(model="m", num_cpus=4, concurrent_batches=1, max_batch_size=16)
    assert (one.batches_at_once, one.torch_threads, one.max_ongoing_requests) == (1, 4, 64)
    gpu = ServeSettings(model="m", num_cpus=2, num_gpus=1)
    assert gpu.batches_at_once == 1
    big = ServeSettings(model="m", num_cpus=8, max_batch_size=8)  # at most 4 batches, 2 threads
    assert (big.batches_at_once, big.torch_threads, big.max_ongoing_requests) == (4, 2, 56)
    with pytest.raises(ValueError, match="concurrent_batches"):
        ServeSettings(model="m", concurrent_batches=99)


def serve_options() -> dict:
    """The `serve` subcommand's options by dest: {dest: argparse action}."""
    from shardtune.cluster.cli import build_parser

    parser = build_parser()
    (verbs,) = [a for a in parser._actions if a.dest == "verb"]
    return {a.dest: a for a in verbs.choices["serve"]._actions if a.option_strings}


@pytest.mark.parametrize("model", ["ServeSettings", "ServerOptions"])
def test_every_setting_is_one_serve_option_with_the_models_default(model):
    """Defaults live in the settings model only: the CLI's option for a field is made from it."""
    import dataclasses

    from shardtune.serving import settings

    options = serve_options()
    for f in dataclasses.fields(getattr(settings, model)):
        flag = "--" + f.name.replace("_", "-")
        assert [a.option_strings for a in options.values() if a.dest == f.name] == [[flag]]
        action = options[f.name]
        if f.default is dataclasses.MISSING:
            assert action.required
        else:
            assert action.default == f.default and not action.required, f.name
        assert action.help.startswith(f.metadata["doc"])
        assert action.choices == f.metadata["choices"]


def test_a_default_changed_in_the_model_is_the_clis_default(monkeypatch):
    import dataclasses

    from shardtune.serving.settings import ServerOptions, ServeSettings

    for model, name in [(ServeSettings, "max_batch_size"), (ServerOptions, "port")]:
        field = next(f for f in dataclasses.fields(model) if f.name == name)
        monkeypatch.setattr(field, "default", 7)
        assert serve_options()[name].default == 7


def test_serve_arguments_build_the_models_as_their_defaults():
    from shardtune.cluster.cli import _settings, build_parser
    from shardtune.serving.settings import ServerOptions, ServeSettings

    args = build_parser().parse_args(["serve", "--model", "m", "--max-batch-size", "8"])
    assert _settings(ServeSettings, args) == ServeSettings(model="m", max_batch_size=8)
    assert _settings(ServerOptions, args) == ServerOptions()


def test_the_batcher_takes_its_size_and_wait_from_the_settings_only():
    """@serve.batch is given no batch size or wait of its own (they would be a second default):
    the replica sets both from ServeSettings through Serve's setters."""
    import ast
    from pathlib import Path

    source = (Path(__file__).resolve().parents[2] / "serving" / "app.py").read_text()
    batch_args = [
        {k.arg for k in node.keywords}
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "batch"
    ]
    assert batch_args == [{"max_concurrent_batches"}]
    assert "set_max_batch_size(s.max_batch_size)" in source
    assert "set_batch_wait_timeout_s(s.batch_wait_ms / 1000)" in source
