"""``skyhop certs``, ``skyhop acl`` and ``skyhop mosquitto-config``: the fleet's PKI, the
rights Mosquitto grants each identity, and a mutual-TLS Mosquitto config.
``register(app)`` adds them to the CLI.

Errors are ConfigError with one line that says what to do; skyhop.cli.main prints them.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated

import typer

from skyhop import audit
from skyhop.errors import ConfigError
from skyhop.home import Home, default_home
from skyhop.mqtt.url import MqttUrl
from skyhop.protocol.topics import Topics
from skyhop.security.pki import CA_DAYS, CRL_DAYS, LEAF_DAYS, ROLES, Pki

certs_app = typer.Typer(
    help="The fleet's certificate authority: issue, revoke and list the "
    "certificates that devices, brokers and clients log in with.",
    no_args_is_help=True,
)
acl_app = typer.Typer(
    help="What Mosquitto lets each identity publish, read and subscribe to, from its "
    "certificate's role.",
    no_args_is_help=True,
)

# Same option as skyhop.cli's HomeOpt (not imported: skyhop.cli imports this module).
HomeOpt = Annotated[
    Path | None,
    typer.Option(
        "--home", help="Fleet home (config and keys). Default: $SKYHOP_HOME, else ~/.skyhop."
    ),
]
PrefixOpt = Annotated[
    str | None, typer.Option(help="Topic prefix. Default: the home's config.toml (skyhop/v1/).")
]
AgentRepliesOpt = Annotated[
    bool,
    typer.Option(
        "--agents-reply-to-clients",
        help="Also let agents publish to client reply topics (off: only brokers may, "
        "see docs/security.md).",
    ),
]
_APPLY = ("apply it: `skyhop mosquitto-config --home {home} ...` again, send Mosquitto "
          "SIGHUP, and run `skyhop acl apply --home {home} --mqtt mqtts://...`")


audit_app = typer.Typer(
    help="The fleet's audit trail (HOME/audit.jsonl): who changed certificates, keys, "
    "rights, SLAs and the pool, hash-chained so that an edit shows.",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    """Add ``certs``, ``acl``, ``audit`` and ``mosquitto-config`` to the ``skyhop`` app."""
    app.add_typer(certs_app, name="certs")
    app.add_typer(acl_app, name="acl")
    app.add_typer(audit_app, name="audit")
    app.command("mosquitto-config")(mosquitto_config)


def _home(home: Path | None) -> Home:
    return Home(home or default_home())


def _prefix(home: Home, prefix: str | None) -> str:
    return prefix if prefix is not None else home.config().prefix


def _err(text: str) -> None:
    typer.echo(text, err=True)


# -- certs ----------------------------------------------------------------------------


@certs_app.command("init")
def certs_init(
    home: HomeOpt = None,
    days: Annotated[int, typer.Option(help="CA validity in days.")] = CA_DAYS,
    force: Annotated[
        bool,
        typer.Option(help="Replace an existing CA (every certificate it issued stops working)."),
    ] = False,
) -> None:
    """Create the fleet CA (EC P-256) under HOME/pki/: ca.crt, ca.key, crl.pem."""
    pki = Pki(_home(home).path)
    cert = pki.init(days=days, force=force)
    typer.echo(f"fleet CA ready in {pki.dir}, valid until {cert.not_valid_after_utc:%Y-%m-%d}")
    typer.echo(f"  {pki.ca_path}   (every component and Mosquitto need this)")
    typer.echo(f"  {pki.ca_key_path}   (the CA key: keep it here, offline if you can)")


@certs_app.command("issue")
def certs_issue(
    name: Annotated[
        str,
        typer.Argument(
            help="The identity: node id, broker id, client id or operator name (becomes the CN)."
        ),
    ],
    role: Annotated[str, typer.Option(help=" | ".join(ROLES))],
    san: Annotated[
        list[str] | None,
        typer.Option("--san", help="Extra DNS name or IP of a server certificate (repeatable)."),
    ] = None,
    days: Annotated[int, typer.Option(help="Validity in days.")] = LEAF_DAYS,
    renew: Annotated[
        bool, typer.Option(help="Issue another certificate for a name that has one (same role).")
    ] = False,
    site: Annotated[
        str | None,
        typer.Option(help="An agent behind this edge site's bridged Mosquitto (see "
                     "`mosquitto-config --bridge-to`).")
    ] = None,
    home: HomeOpt = None,
) -> None:
    """Issue NAME's certificate and key: HOME/pki/NAME.crt and NAME.key (0600)."""
    pki = Pki(_home(home).path)
    item = pki.issue(name, role, sans=san or (), days=days, renew=renew, site=site)
    creds = pki.credentials(name)
    typer.echo(
        f"issued {item.name} ({item.role}), serial {item.serial:x}, "
        f"valid until {item.not_after:%Y-%m-%d}"
    )
    typer.echo(f"  copy to {name}'s machine: {creds.ca} {creds.cert} {creds.key}")
    audit.record(Home(pki.home).audit_path, audit.local_actor(), "certs.issue",
                 {"name": name, "role": role, "serial": f"{item.serial:x}",
                  **({"site": site} if site else {})})
    if role == "server":
        typer.echo(f"next: `skyhop mosquitto-config --server {name} --home {pki.home} ...`")
    elif site:
        typer.echo(f"next: render site {site}'s Mosquitto config again (`skyhop "
                   f"mosquitto-config --site {site} --bridge-to ...`) and restart it")
    else:
        typer.echo(f"next: once Mosquitto runs, {_APPLY.format(home=pki.home)} (a first "
                   "setup does this when it starts Mosquitto)")


@certs_app.command("revoke")
def certs_revoke(name: str, home: HomeOpt = None) -> None:
    """Revoke every certificate of NAME and re-sign HOME/pki/crl.pem."""
    pki = Pki(_home(home).path)
    done = pki.revoke(name)
    serials = ", ".join(f"{e.serial:x}" for e in done)
    typer.echo(f"revoked {name} (serial {serials}); CRL {pki.crl_path} updated")
    audit.record(Home(pki.home).audit_path, audit.local_actor(), "certs.revoke",
                 {"name": name, "serials": serials})
    _err(f"Mosquitto still accepts {name} until you {_APPLY.format(home=pki.home)}")


@certs_app.command("crl")
def certs_crl(
    days: Annotated[int, typer.Option(help="Days until the CRL's nextUpdate.")] = CRL_DAYS,
    home: HomeOpt = None,
) -> None:
    """Re-sign the CRL. Past its nextUpdate Mosquitto refuses EVERY client: run this (and
    mosquitto-config, SIGHUP) well before then, e.g. monthly from cron."""
    pki = Pki(_home(home).path)
    crl = pki.refresh_crl(days=days)
    typer.echo(
        f"CRL {pki.crl_path} re-signed: {len(list(crl))} revoked, "
        f"next update {crl.next_update_utc:%Y-%m-%d}"
    )


@certs_app.command("list")
def certs_list(
    home: HomeOpt = None,
    active: Annotated[
        bool, typer.Option("--active", help="Only certificates neither revoked nor expired.")
    ] = False,
) -> None:
    """List the certificates issued: name, role, serial, expiry, revoked, site."""
    from rich.console import Console
    from rich.table import Table

    pki = Pki(_home(home).path)
    pki.ca_certificate()  # a clear error before `certs init`
    now = dt.datetime.now(dt.timezone.utc)
    table = Table(
        "name", "role", "serial", "expires", "revoked", "site",
        title=f"certificates in {pki.dir}"
    )
    for e in pki.entries():
        if active and not e.active(now):
            continue
        expires = f"{e.not_after:%Y-%m-%d}" + (" (expired)" if e.not_after <= now else "")
        revoked = (
            f"{e.revoked_at:%Y-%m-%d}"
            if e.revoked and e.revoked_at
            else ("yes" if e.revoked else "no")
        )
        table.add_row(e.name, e.role, f"{e.serial:x}", expires, revoked, e.site or "")
    Console().print(table)


# -- acl ------------------------------------------------------------------------------


@acl_app.command("render")
def acl_render(
    home: HomeOpt = None,
    prefix: PrefixOpt = None,
    out: Annotated[Path | None, typer.Option(help="Write here instead of stdout.")] = None,
    agents_reply_to_clients: AgentRepliesOpt = False,
) -> None:
    """Print the rights of every active certificate, as the plugin's JSON file.

    The file of Mosquitto's dynamic-security plugin; `skyhop mosquitto-config` writes it
    too, for Mosquitto to start with."""
    from skyhop.protocol.topics import Topics
    from skyhop.security.acl import render

    h = _home(home)
    pki = Pki(h.path)
    pki.ca_certificate()
    text = render(
        pki.entries(),
        Topics(_prefix(h, prefix)),
        now=dt.datetime.now(dt.timezone.utc),
        agents_reply_to_clients=agents_reply_to_clients,
    )
    if out is None:
        typer.echo(text, nl=False)
    else:
        out.write_text(text)
        _err(f"rights written to {out}")


@acl_app.command("apply")
def acl_apply(
    mqtt: Annotated[
        str | None, typer.Option(help="The Mosquitto to change (mqtts://HOST:PORT). "
                                 "Default: the home's config.toml.")
    ] = None,
    home: HomeOpt = None,
    prefix: PrefixOpt = None,
    identity: Annotated[
        str, typer.Option("--identity", help="Operator certificate (CN) to connect as.")
    ] = "operator",
    agents_reply_to_clients: AgentRepliesOpt = False,
) -> None:
    """Give a running Mosquitto the rights of the certificates now active.

    New names get theirs; revoked and expired ones lose theirs and are disconnected.
    Connects as an operator and sends only what differs; the rights are in force when
    it returns. Run it after `certs issue` or `certs revoke`, `mosquitto-config` and
    SIGHUP."""
    from skyhop.security.dynsec import apply_registry, summary

    h = _home(home)
    url = mqtt or h.config().mqtt
    if h.tls(url, identity) is None:
        raise ConfigError(f"{url} is plain MQTT, which has no rights to apply: use mqtts://")
    with _Bar("applying rights") as bar:
        count, commands = apply_registry(Pki(h.path), url, identity, _prefix(h, prefix),
                                         agents_reply_to_clients=agents_reply_to_clients,
                                         progress=bar.update)
    _err(f"{url}: {count} identities with rights; {summary(commands)}")
    audit.record(h.audit_path, identity, "acl.apply",
                 {"server": url, "identities": count, "commands": summary(commands)})


class _Bar:
    """A progress bar on stderr, shown only once there is more than one batch to send."""

    def __init__(self, what: str) -> None:
        from rich.console import Console
        from rich.progress import Progress, TaskID

        self.what = what
        self.task: TaskID | None = None
        self.progress = Progress(console=Console(stderr=True), transient=True)

    def __enter__(self) -> _Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.task is not None:
            self.progress.stop()

    def update(self, done: int, total: int) -> None:
        if self.task is None and done < total:
            self.progress.start()
            self.task = self.progress.add_task(self.what, total=total)
        if self.task is not None:
            self.progress.update(self.task, completed=done)


# -- mosquitto ------------------------------------------------------------------------


def mosquitto_config(
    port: Annotated[int, typer.Option(help="TLS listener port (8883 is MQTT over TLS).")],
    home: HomeOpt = None,
    out: Annotated[
        Path | None, typer.Option(help="Write the config here instead of stdout.")
    ] = None,
    files_dir: Annotated[
        Path | None,
        typer.Option(
            help="Where Mosquitto reads its certificate, key, CRL and rights. Default: "
            "HOME/mosquitto (it must be reachable by the user Mosquitto drops to)."
        ),
    ] = None,
    bind: Annotated[
        str, typer.Option(help="Listen on this address only: 0.0.0.0 for every interface, "
                          "or the address the fleet's devices reach.")
    ] = "127.0.0.1",
    server: Annotated[
        str | None,
        typer.Option(
            help="Server certificate name (default: the newest; issues mqtt-server if none)."
        ),
    ] = None,
    san: Annotated[
        list[str] | None,
        typer.Option(
            "--san", help="DNS name or IP for a server certificate issued now (repeatable)."
        ),
    ] = None,
    user: Annotated[
        str, typer.Option(help="The user Mosquitto drops to when started as root.")
    ] = "mosquitto",
    persistence: Annotated[
        Path | None,
        typer.Option(help="Keep retained messages in this directory (default: no persistence)."),
    ] = None,
    prefix: PrefixOpt = None,
    agents_reply_to_clients: AgentRepliesOpt = False,
    bridge_to: Annotated[
        str | None,
        typer.Option(help="This is an edge site's Mosquitto: bridge its agents' topics to "
                     "the cloud one at this mqtts://HOST:PORT (needs --site).")
    ] = None,
    site: Annotated[
        str | None,
        typer.Option(help="The site's identity (`certs issue SITE --role site`); the agents "
                     "issued with --site SITE are the ones bridged.")
    ] = None,
) -> None:
    """Print a complete Mosquitto config for the fleet: mutual TLS 1.3, CRL, per-identity
    rights (the dynamic-security plugin); with --bridge-to, an edge site's, bridged to
    the cloud Mosquitto over mutual TLS.

    Also writes the files it names (server certificate and key, CA, CRL, rights, the
    site's certificate) to --files-dir. Run `mosquitto -c` on the result; after every
    certs issue or revoke, rerun this, send Mosquitto SIGHUP, and run `skyhop acl apply`
    (a site's Mosquitto: restart it, to bridge a new agent).
    """
    from skyhop.security.mosquitto_conf import prepare, render

    h = _home(home)
    bridge_url = _bridge_url(bridge_to, site)
    persistence = persistence.absolute() if persistence else None
    files = prepare(
        h.path,
        files_dir=files_dir,
        prefix=_prefix(h, prefix),
        server=server,
        sans=san or (),
        user=user,
        persistence=persistence,
        agents_reply_to_clients=agents_reply_to_clients,
        site=site,
    )
    text = render(files.dir, port, bind=bind, user=user, persistence=persistence)
    if bridge_url is not None and site is not None:
        text += "\n" + _bridge_section(h, site, bridge_url, files.dir, _prefix(h, prefix))
    if out is None:
        typer.echo(text, nl=False)
    else:
        out.write_text(text)
        _err(f"Mosquitto config written to {out}; run: mosquitto -c {out}")
    _err(f"server certificate {files.server}, CRL and rights in {files.dir}")
    if bind in ("127.0.0.1", "::1", "localhost"):
        _err(f"listening on {bind}:{port} only, for this host: pass --bind 0.0.0.0 (or the "
             "address devices reach) to open it to the fleet")


def _bridge_url(url: str | None, site: str | None) -> MqttUrl | None:
    if url is None:
        if site is not None:
            raise ConfigError("--site names the site of a bridged Mosquitto: give --bridge-to "
                              "mqtts://CLOUD:8883 as well")
        return None
    parsed = MqttUrl.parse(url)
    if not parsed.tls:
        raise ConfigError(f"--bridge-to {url}: the bridge crosses the WAN, so it is mutual "
                          "TLS only: use mqtts://HOST:PORT")
    if site is None:
        raise ConfigError("--bridge-to needs --site SITE: the identity the bridge logs in "
                          "as (`skyhop certs issue SITE --role site`)")
    return parsed


def _bridge_section(h: Home, site: str, url: MqttUrl, files: Path, prefix: str) -> str:
    from skyhop.security.bridge import Bridge, render, site_nodes

    now = dt.datetime.now(dt.timezone.utc)
    nodes = site_nodes(Pki(h.path).entries(), site, now)
    if not nodes:
        _err(f"no agent is issued to site {site} yet: `skyhop certs issue NODE --role edge "
             f"--site {site}`, then run this again")
    else:
        _err(f"bridging {len(nodes)} agent(s) of site {site} to {url.host}:{url.port}: "
             + ", ".join(nodes))
    return render(Bridge(site, url.host, url.port, nodes, Topics(prefix), tls=files))


# -- audit ----------------------------------------------------------------------------


@audit_app.command("list")
def audit_list(
    since: Annotated[
        str | None, typer.Option(help="Only entries from this time on: ISO 8601 "
                                 "(2026-12-01, 2026-12-01T09:30) or an age (90m, 2h, 7d).")
    ] = None,
    json_: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    home: HomeOpt = None,
) -> None:
    """Show the trail, oldest first (it is checked as it is read: see `audit verify`)."""
    import json

    path = _home(home).audit_path
    start = _since(since) if since else None
    try:
        for e in audit.entries(audit.read_lines(path)):
            if start is not None and e.time < start:
                continue
            if json_:
                typer.echo(json.dumps({"line": e.number, "time": e.time.isoformat(),
                                       "actor": e.actor, "action": e.action,
                                       "changed": e.changed}))
            else:
                changed = " ".join(f"{k}={v}" for k, v in e.changed.items())
                typer.echo(f"{e.time:%Y-%m-%d %H:%M:%S} {e.actor:<16} {e.action:<13} {changed}")
    except audit.Broken as exc:
        raise ConfigError(f"{path}: {exc}; `skyhop audit verify` checks the whole "
                          "trail") from None


@audit_app.command("verify")
def audit_verify(home: HomeOpt = None) -> None:
    """Check the hash chain: exit 0 if intact, else 1 naming the first bad line."""
    path = _home(home).audit_path
    lines = audit.read_lines(path)
    try:
        count = sum(1 for _ in audit.entries(lines))
    except audit.Broken as exc:
        _err(f"{path}: broken at {exc}")
        raise typer.Exit(1) from None
    typer.echo(f"{path}: {count} entries intact; head {audit.head(lines)} (keep it "
               "elsewhere to show later that no entry was cut off the end)")


def _since(text: str) -> dt.datetime:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    now = dt.datetime.now(dt.timezone.utc)
    if text[-1:] in units and text[:-1].replace(".", "", 1).isdigit():
        return now - dt.timedelta(seconds=float(text[:-1]) * units[text[-1]])
    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"--since {text!r}: give an ISO 8601 time (2026-12-01T09:30) "
                          "or an age (90m, 2h, 7d)") from None
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)
