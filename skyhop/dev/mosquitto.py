"""Run a private Mosquitto broker for development and tests.

Tests never share the system broker: each starts its own on a free loopback port::

    with MosquittoProcess.start() as broker:          # deploy/mosquitto/dev.conf
        bus = Bus(broker.url, "me")
        ...

``start`` renders a config template with ``str.format`` (``{port}`` plus any ``params``)
into a work directory, runs ``mosquitto -c``, and returns once the port accepts TCP.
The broker's stderr goes to ``mosquitto.log`` in that directory; a broker that will not
start raises ConfigError quoting the end of that log.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from typing_extensions import Self  # typing.Self is 3.11+

from skyhop.errors import ConfigError

if TYPE_CHECKING:
    from skyhop.security.bridge import Bridge

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DEV_CONF = DEPLOY / "mosquitto" / "dev.conf"
_FALLBACK_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
_LOG_TAIL_LINES = 20


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS may hand it out again; callers retry)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def find_mosquitto() -> str:
    """Path of the ``mosquitto`` binary: PATH first, then the Debian location (sbin is
    often not on a normal user's PATH). Raises ConfigError if there is none."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in _FALLBACK_PATHS:
        if Path(candidate).is_file():
            return candidate
    raise ConfigError(
        "mosquitto not found: install it with `apt-get install mosquitto` (Debian/Ubuntu)"
    )


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class MosquittoProcess:
    """A running ``mosquitto`` child process. Use ``MosquittoProcess.start(...)``.

    ``url`` is ``mqtt://127.0.0.1:PORT``; ``stop()`` (also on leaving ``with``) terminates
    it; ``restart()`` stops it and starts it again on the same port, as a broker restart
    looks to clients.
    """

    def __init__(
        self,
        *,
        config: Path,
        log: Path,
        port: int,
        workdir: Path,
        owns_workdir: bool,
        host: str = "127.0.0.1",
    ) -> None:
        # Prefer start(): this only wires a process that start() launches.
        self.config = config
        self.log = log
        self.port = port
        self.host = host
        self.workdir = workdir
        self._owns_workdir = owns_workdir
        self._proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def start(
        cls,
        template: Path | str = DEV_CONF,
        port: int | None = None,
        workdir: Path | str | None = None,
        *,
        params: Mapping[str, object] | None = None,
        timeout: float = 10.0,
    ) -> MosquittoProcess:
        """Render ``template`` and start Mosquitto on ``port`` (a free one if None).

        ``params`` fills further ``{name}`` placeholders; ``{workdir}`` is always the
        directory holding the rendered config; ``{port}``, and a ``listener 1883`` line,
        the port. Raises ConfigError if the binary or the
        template is missing, or the broker does not accept TCP within ``timeout``.
        """
        template = Path(template)
        try:
            text = template.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read Mosquitto template {template}: {exc}") from None
        owns = workdir is None
        wd = (
            Path(workdir)
            if workdir is not None
            else Path(tempfile.mkdtemp(prefix="skyhop-mosquitto-"))
        )
        wd.mkdir(parents=True, exist_ok=True)
        # A port picked by free_port() can be taken by someone else before Mosquitto binds
        # it; only when we picked it is trying another one the right answer.
        attempts = 3 if port is None else 1
        for attempt in range(attempts):
            chosen = port if port is not None else free_port()
            try:
                rendered = text.format(port=chosen, workdir=wd, **(params or {}))
                # dev.conf is also a config to run as it is, on the standard port
                rendered = re.sub(r"(?m)^listener 1883\b", f"listener {chosen}", rendered)
            except (KeyError, IndexError, ValueError) as exc:
                raise ConfigError(
                    f"cannot render {template}: placeholder {exc} has no value "
                    "(pass it in params=, and double literal braces)"
                ) from None
            config = wd / "mosquitto.conf"
            config.write_text(rendered)
            broker = cls(
                config=config, log=wd / "mosquitto.log", port=chosen, workdir=wd, owns_workdir=owns
            )
            broker.log.unlink(missing_ok=True)  # this attempt's log only
            try:
                broker._launch(timeout)
            except ConfigError:
                if attempt + 1 == attempts or "Address already in use" not in broker._log_tail():
                    raise
                continue
            return broker
        raise AssertionError("unreachable")

    @classmethod
    def start_site(cls, bridge: Bridge, workdir: Path | str | None = None) -> MosquittoProcess:
        """An edge site's Mosquitto: dev.conf (plain, loopback) with ``bridge``'s section
        (skyhop.security.bridge), so its agents' topics reach the cloud Mosquitto."""
        from skyhop.security.bridge import render

        wd = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="skyhop-site-"))
        wd.mkdir(parents=True, exist_ok=True)
        template = wd / "site.conf.in"
        template.write_text(DEV_CONF.read_text() + "\n" + render(bridge).replace("{", "{{")
                            .replace("}", "}}"))
        site = cls.start(template, workdir=wd)
        site._owns_workdir = workdir is None
        return site

    def _launch(self, timeout: float) -> None:
        binary = find_mosquitto()
        with self.log.open("ab") as log:
            # start_new_session: a Ctrl-C aimed at pytest must not reach the broker first,
            # or teardown finds it already gone mid-test.
            self._proc = subprocess.Popen(
                [binary, "-c", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                raise ConfigError(
                    f"mosquitto exited at start (config {self.config}):\n{self._log_tail()}"
                )
            # Checking the process is still alive after the port answers guards against
            # the port belonging to some other server while Mosquitto fails to bind it.
            if _port_open(self.host, self.port) and self._proc.poll() is None:
                return
            time.sleep(0.02)
        self._terminate()
        raise ConfigError(
            f"mosquitto did not accept TCP on {self.host}:{self.port} within {timeout:g} s "
            f"(config {self.config}):\n{self._log_tail()}"
        )

    def _log_tail(self) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-_LOG_TAIL_LINES:]) or "(empty log)"

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def reload(self) -> None:
        """SIGHUP: Mosquitto re-reads its CRL (and only on this signal)."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGHUP)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def restart(self, timeout: float = 10.0, down_s: float = 0.0) -> Self:
        """Stop, stay down ``down_s``, and start again on the same port with the same
        config (keeps the workdir)."""
        self._terminate()
        time.sleep(down_s)
        self._launch(timeout)
        return self

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def stop(self) -> None:
        """Terminate the broker (SIGTERM, then SIGKILL after 5 s); idempotent."""
        self._terminate()
        if self._owns_workdir:
            with contextlib.suppress(OSError):
                shutil.rmtree(self.workdir)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"MosquittoProcess({self.url}, {state}, config={self.config})"


class TlsMosquitto:
    """A private Mosquitto with the fleet's mutual-TLS config, rights and CRL.

        with TlsMosquitto.start(home) as server:    # server.url is mqtts://127.0.0.1:PORT
            ...
            server.refresh()                       # after issuing or revoking certificates

    Its files live in a fresh directory under /tmp that the ``mosquitto`` user can
    enter: started as root, Mosquitto drops to that user before reading them.
    ``refresh`` changes the rights as an operator: the home's first, else ``mqtt-admin``,
    issued for it.
    """

    def __init__(self, home: Path, prefix: str, files: Path, process: MosquittoProcess,
                 admin: str) -> None:
        self.home, self.prefix, self.files, self.process = home, prefix, files, process
        self.admin = admin

    @classmethod
    def start(cls, home: Path | str, *, prefix: str = "skyhop/v1/",
              workdir: Path | str | None = None) -> TlsMosquitto:
        from skyhop.security.mosquitto_conf import prepare, render

        home = Path(home)
        admin = _operator(home)  # before prepare: its rights are in the file Mosquitto reads
        files = Path(tempfile.mkdtemp(prefix="skyhop-mqtt-files-"))
        files.chmod(0o755)  # prepare() puts a root:mosquitto 0750 directory inside
        prepared = prepare(home, files_dir=files / "tls", prefix=prefix)
        port = free_port()
        wd = Path(workdir) if workdir is not None else files / "run"
        wd.mkdir(parents=True, exist_ok=True)
        conf = wd / "skyhop-tls.conf"
        conf.write_text(render(prepared.dir, port, bind="127.0.0.1"))
        process = MosquittoProcess.start(conf, port=port, workdir=wd)
        return cls(home, prefix, files, process, admin)

    @property
    def url(self) -> str:
        return f"mqtts://127.0.0.1:{self.process.port}"

    def refresh(self) -> None:
        """Bring the CRL and the rights to the home's PKI: SIGHUP for the CRL (new
        connections see it soon after), ``skyhop acl apply`` for the rights (in force when
        this returns)."""
        from skyhop.security.dynsec import apply_registry
        from skyhop.security.mosquitto_conf import prepare
        from skyhop.security.pki import Pki

        prepare(self.home, files_dir=self.files / "tls", prefix=self.prefix)
        self.process.reload()
        apply_registry(Pki(self.home), self.url, self.admin, self.prefix)

    def stop(self) -> None:
        self.process.stop()
        shutil.rmtree(self.files, ignore_errors=True)

    def __enter__(self) -> TlsMosquitto:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _operator(home: Path) -> str:
    """An operator identity of ``home`` to manage Mosquitto's rights with."""
    from skyhop.security.pki import Pki

    pki = Pki(home)
    names = [e.name for e in pki.active() if e.role == "operator"]
    if names:
        return names[0]
    pki.issue("mqtt-admin", "operator")
    return "mqtt-admin"
