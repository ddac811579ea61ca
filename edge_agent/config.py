"""The agent's configuration: the ``[agent]`` section of a fleet's config.toml.

    config = load(home)          # validated, or a ConfigError naming the file and key
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from skyhop.home import Config, Home
from skyhop.schema import Strict, validated


class AgentConfig(Strict):
    # Who this node is: `skyhop bundle` writes them, so that an installed agent starts
    # with `skyhop agent --home H` alone; --node-id, --role and --models override.
    node_id: str | None = Field(None, description="default: the host name")
    role: Literal["edge", "cloud"] = "edge"
    models: list[str] = Field(default_factory=list, description="models to serve")
    queue_capacity: int = Field(64, ge=1, le=100_000)
    concurrency: int | None = Field(
        None, ge=1, le=64,
        description="requests run at once; default from the device: 1 on a CPU, 4 on a GPU",
    )
    batching: bool | None = Field(
        None, description="run queued requests of one model together, up to its max_batch; "
                          "default from the device: on with a GPU, off on a CPU",
    )
    max_queue_delay_ms: float | None = Field(
        None, ge=0, le=1000,
        description="how long a request may wait for others to batch with; default: the "
                    "catalog's (0 for every shipped model)",
    )
    load_interval_s: float = Field(0.5, gt=0)
    replay_window_s: float = Field(60.0, gt=0)
    result_cache: int = Field(1024, ge=0, description="recent results kept to answer duplicates")
    tensorrt_fp16: bool = Field(
        False, description="let TensorRT build fp16 engines: faster, and different numerics"
    )


def load(home: Home, config: Config | None = None) -> AgentConfig:
    """The home's ``[agent]`` section, validated (from ``config``, if read already)."""
    config = config if config is not None else home.config()
    return validated(AgentConfig, config.agent, str(home.config_path), "agent")
