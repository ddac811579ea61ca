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

from skyhop.errors import ConfigError
from skyhop.home import Home, default_home
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


def register(app: typer.Typer) -> None:
    """Add ``certs``, ``acl`` and ``mosquitto-config`` to the ``skyhop`` app."""
    app.add_typer(certs_app, name="certs")
    app.add_typer(acl_app, name="acl")
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
    home: HomeOpt = None,
) -> None:
    """Issue NAME's certificate and key: HOME/pki/NAME.crt and NAME.key (0600)."""
    pki = Pki(_home(home).path)
    item = pki.issue(name, role, sans=san or (), days=days, renew=renew)
    creds = pki.credentials(name)
    typer.echo(
        f"issued {item.name} ({item.role}), serial {item.serial:x}, "
        f"valid until {item.not_after:%Y-%m-%d}"
    )
    typer.echo(f"  copy to {name}'s machine: {creds.ca} {creds.cert} {creds.key}")
    if role == "server":
        _err(f"use it with `skyhop mosquitto-config --server {name} --home {pki.home} ...`")
    else:
        _err(f"Mosquitto grants {name} nothing until you {_APPLY.format(home=pki.home)}")


@certs_app.command("revoke")
def certs_revoke(name: str, home: HomeOpt = None) -> None:
    """Revoke every certificate of NAME and re-sign HOME/pki/crl.pem."""
    pki = Pki(_home(home).path)
    done = pki.revoke(name)
    serials = ", ".join(f"{e.serial:x}" for e in done)
    typer.echo(f"revoked {name} (serial {serials}); CRL {pki.crl_path} updated")
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
    """List the certificates issued: name, role, serial, expiry, revoked."""
    from rich.console import Console
    from rich.table import Table

    pki = Pki(_home(home).path)
    pki.ca_certificate()  # a clear error before `certs init`
    now = dt.datetime.now(dt.timezone.utc)
    table = Table(
        "name", "role", "serial", "expires", "revoked", title=f"certificates in {pki.dir}"
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
        table.add_row(e.name, e.role, f"{e.serial:x}", expires, revoked)
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
        str | None, typer.Option(help="Listen on this address only (default: every interface).")
    ] = None,
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
) -> None:
    """Print a complete Mosquitto config for the fleet: mutual TLS 1.3, CRL, per-identity
    rights (the dynamic-security plugin).

    Also writes the files it names (server certificate and key, CA, CRL, rights) to
    --files-dir. Run `mosquitto -c` on the result; after every certs issue or revoke,
    rerun this, send Mosquitto SIGHUP, and run `skyhop acl apply`.
    """
    from skyhop.security.mosquitto_conf import prepare, render

    h = _home(home)
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
    )
    text = render(files.dir, port, bind=bind, user=user, persistence=persistence)
    if out is None:
        typer.echo(text, nl=False)
    else:
        out.write_text(text)
        _err(f"Mosquitto config written to {out}; run: mosquitto -c {out}")
    _err(f"server certificate {files.server}, CRL and rights in {files.dir}")
