"""How many requests an agent runs at once when its config does not say."""

from __future__ import annotations

from edge_agent.builder import GPU_CONCURRENCY, device_concurrency
from edge_agent.config import AgentConfig
from edge_agent.runner import CPU, CUDA, TRT, FakeRunner, TensorSpec

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
