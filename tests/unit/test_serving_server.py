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
