"""How many requests an agent runs at once when its config does not say."""

from __future__ import annotations

from edge_agent.builder import GPU_CONCURRENCY, batch_policy, device_concurrency
from edge_agent.config import AgentConfig
from edge_agent.runner import CPU, CUDA, TRT, FakeRunner, TensorSpec
from skyhop.models import load_catalog

SPECS = [TensorSpec("x", "float32", ("N", 3))]


def runner(provider: str) -> FakeRunner:
    return FakeRunner("m", SPECS, SPECS, provider=provider)


def test_one_at_a_time_on_a_cpu_several_on_a_gpu() -> None:
    assert device_concurrency([runner(CPU), runner(CPU)]) == 1
    assert device_concurrency([runner("fake")]) == 1
    assert device_concurrency([runner(CPU), runner(CUDA)]) == GPU_CONCURRENCY > 1
    assert device_concurrency([runner(TRT)]) == GPU_CONCURRENCY


def test_the_config_leaves_it_to_the_device_unless_it_says() -> None:
    assert AgentConfig().concurrency is None
    assert AgentConfig(concurrency=3).concurrency == 3


def test_batching_follows_the_catalog_and_the_config() -> None:
    rec = load_catalog().get("ppocr-rec")
    on = batch_policy(rec, AgentConfig(batching=True))
    assert (on.max_batch, on.max_delay_ms) == (rec.max_batch, 0.0) and on.enabled
    assert not batch_policy(rec, AgentConfig(batching=False)).enabled
    delayed = batch_policy(rec, AgentConfig(batching=True, max_queue_delay_ms=2.5))
    assert delayed.max_delay_ms == 2.5
    assert AgentConfig().batching is None  # the builder decides: on with a GPU (on_gpu)
