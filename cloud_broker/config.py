"""The broker's configuration: the ``[broker]`` section of a fleet's config.toml.

    config = load(home)          # validated, or a ConfigError naming the file and key
    scaling = scale_config(config.autoscale, config.margin)

Names and defaults come from the modules that use them (``placement.POLICIES``,
``autoscaler.ScaleConfig``, ``dispatch.DispatchConfig``): nothing here is a copy to
keep equal by hand.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Literal

from pydantic import Field, NonNegativeInt, field_validator, model_validator

from cloud_broker.autoscaler import AUTOSCALERS, ScaleConfig
from cloud_broker.dispatch import DispatchConfig
from cloud_broker.placement import POLICIES
from skyhop.errors import ConfigError
from skyhop.home import Config, Home
from skyhop.protocol.topics import check_name
from skyhop.schema import Strict, one_of, validated

_D = ScaleConfig()  # the autoscaler's defaults


class AutoscaleConfig(Strict):
    """The cloud GPU pool the broker sizes with ``cloud_broker.autoscaler.scale()``.

    The fields shared with ``ScaleConfig`` take its defaults, except ``max_size``: a
    local pool's workers share this machine.
    """

    backend: Literal["none", "local", "kubernetes", "ray"] = Field(
        "none", description="none: cloud workers are started by hand; local: as processes "
        "here; kubernetes: as the pods of one Deployment; ray: as Ray actors on a Ray "
        "cluster (docs/pool.md)"
    )
    namespace: str = Field("skyhop", description="kubernetes: the pool's namespace")
    deployment: str = Field("skyhop-worker", description="kubernetes: the workers' Deployment")
    kube_context: str | None = Field(
        None, description="kubernetes: a kubeconfig context (default: in a pod, its service "
        "account; elsewhere KUBECONFIG's current context)")
    ray_address: str = Field(
        "local", description="ray: 'local' starts a cluster here; 'auto' or ray://HOST:PORT "
        "joins one")
    num_gpus: float = Field(1.0, ge=0, description="ray: GPUs per worker (0 on CPU nodes)")
    num_cpus: float = Field(1.0, ge=0, description="ray: CPUs per worker")
    policy: str = Field(_D.policy, description="one of autoscaler.AUTOSCALERS")
    models: list[str] = Field([], description="the models a pool worker serves")
    min_size: int = Field(_D.min_size, ge=0)
    max_size: int = Field(4, ge=0)
    static_size: int = Field(_D.static_size, ge=0,
                             description="the fixed size of policy static-peak")
    interval_ms: float = Field(_D.interval_ms, gt=0, description="how often the pool is sized")
    slots: int = Field(1, ge=1, le=64, description="requests a worker runs at once")
    providers: list[Literal["tensorrt", "cuda", "cpu"]] = Field(
        [], description="a worker's ONNX Runtime providers ([]: its own TensorRT > CUDA > CPU)"
    )
    gpus: list[NonNegativeInt] = Field(
        [], description="GPUs to spread workers over, round robin ([]: each takes GPU 0)"
    )
    scale_to_zero: bool = _D.scale_to_zero
    idle_to_zero_ms: float = Field(_D.idle_to_zero_ms, ge=0)
    downscale_delay_ms: float = Field(_D.downscale_delay_ms, ge=0,
                                      description="the shortest hold")
    max_hold_leads: float = Field(
        _D.max_hold_leads, ge=0,
        description="the hold after a regret, in cold start + interval (0: none)",
    )
    hold_memory_ms: float = Field(_D.hold_memory_ms, ge=0,
                                  description="how long a regret counts")
    price_per_gpu_hour: float = Field(_D.price_per_gpu_hour, ge=0)
    cost_cap_per_hour: float | None = Field(_D.cost_cap_per_hour, ge=0)
    cold_start_prior_ms: float = Field(
        _D.cold_start_prior_ms, ge=0,
        description="assumed until a worker's cold start is measured",
    )
    early_warning: float = Field(
        _D.early_warning, ge=0, le=1,
        description="share of the rise in all requests counted as cloud demand ahead of the "
        "spill (docs/performance.md, Choosing early_warning)",
    )
    worker_prefix: str = Field("pool", description="workers are named PREFIX-1, PREFIX-2, …")
    stop_grace_s: float = Field(10.0, gt=0, description="SIGKILL a stopped worker after this")

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, policy: str) -> str:
        return one_of(policy, AUTOSCALERS, "autoscaler")

    @model_validator(mode="after")
    def _coherent(self) -> AutoscaleConfig:
        if self.min_size > self.max_size:
            raise ValueError(f"min_size {self.min_size} is above max_size {self.max_size}")
        if self.backend != "none" and not self.models:
            raise ValueError(
                f'the {self.backend} pool needs the models its workers serve: models = '
                '["digits"] under [broker.autoscale], or skyhop broker --pool-models digits'
            )
        if self.policy == "static-peak" and not self.static_size:
            raise ValueError("policy static-peak needs static_size, the pool's fixed size")
        try:
            check_name("worker prefix", self.worker_prefix)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return self


class BrokerConfig(Strict):
    policy: str = Field(DispatchConfig.policy, description="one of placement.POLICIES")
    margin: float = Field(DispatchConfig.margin, gt=0, le=1,
                          description="plan to finish within margin × budget")
    node_timeout_s: float = Field(5.0, gt=0, description="a node silent this long is dead")
    replay_window_s: float = Field(60.0, gt=0)
    status_interval_s: float = Field(1.0, gt=0)
    reply_grace_ms: float = Field(
        DispatchConfig.reply_grace_ms, ge=0,
        description="wait this long past a deadline before answering it"
    )
    drain_s: float = Field(
        20.0, ge=0, description="on SIGTERM, wait this long for accepted requests' replies"
    )
    client_rate: float = Field(0.0, ge=0, description="requests/s one client may send (0: any)")
    client_burst: float = Field(100.0, ge=1, description="requests one client may send at once")
    node_rate: float = Field(
        20.0, ge=0, description="status and load messages/s one node may send (0: any)"
    )
    node_burst: float = Field(40.0, ge=1, description="such messages one node may send at once")
    autoscale: AutoscaleConfig = AutoscaleConfig()

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, policy: str) -> str:
        return one_of(policy, POLICIES, "policy")


def load(home: Home, config: Config | None = None) -> BrokerConfig:
    """The home's ``[broker]`` section, validated (from ``config``, if read already)."""
    config = config if config is not None else home.config()
    return validated(BrokerConfig, config.broker, str(home.config_path), "broker")


def scale_config(config: AutoscaleConfig, margin: float) -> ScaleConfig:
    """The autoscaler's config from the home's ``[broker.autoscale]`` and the placement's
    margin; fields only the pool backend reads (backend, models, …) are left out."""
    shared = {f.name for f in fields(ScaleConfig)}
    values = {k: v for k, v in config.model_dump().items() if k in shared}
    return ScaleConfig(**values, margin=margin)
