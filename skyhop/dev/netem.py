"""A user-space WAN emulator: a TCP proxy that adds delay and a bandwidth cap.

Put it between a client and the broker to see how skyhop behaves over a slow link::

    proxy = DelayProxy("127.0.0.1", broker.port, delay_ms=40, bandwidth_mbps=20)
    proxy.start()
    bus = Bus(proxy.url, "edge-1")          # every byte now crosses a 40 ms, 20 Mbit/s link
    ...
    proxy.stop()
"""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType

from typing_extensions import Self  # typing.Self is 3.11+

_CHUNK = 64 * 1024
# Bytes a direction may hold in flight before the proxy stops reading (TCP backpressure
# to the sender). Throughput with delay alone is capped near _BUFFER / delay: 16 MiB at
# 100 ms is ~160 MiB/s, far above any link we emulate.
_BUFFER = 16 * 1024 * 1024
_EOF = b""


class DelayProxy:
    """Forward TCP to ``target_host:target_port``, delaying each direction by ``delay_ms``.

    This is a user-space emulation: the dev/CI machines have no kernel netem, and where
    it exists (``tc qdisc add dev lo root netem delay ...``) it needs root and slows every
    process on the interface, the broker's other clients included. The proxy delays only
    the connections sent through it, so one test can mix near and far nodes.

    Each chunk read from one side is delivered to the other ``delay_ms`` later, in order;
    with ``bandwidth_mbps`` each direction is also a serial link of that rate, so a chunk
    waits for the ones before it and then takes ``len * 8 / rate`` to "transmit". There
    is no jitter, loss or reordering unless added (TCP underneath would turn loss into
    delay anyway), and the delay applies per read chunk rather than per packet, which is
    what an application above TCP sees.

    ``start()`` returns the listening port (``listen_port=0`` picks a free one); ``url``
    is ``mqtt://listen_host:port`` for a Bus; ``cut()`` and ``restore()`` take the link
    down and back up (a WAN outage); ``stop()`` closes every connection.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        delay_ms: float,
        bandwidth_mbps: float | None = None,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
    ) -> None:
        if delay_ms < 0:
            raise ValueError(f"delay_ms must be >= 0, got {delay_ms}")
        if bandwidth_mbps is not None and bandwidth_mbps <= 0:
            raise ValueError(f"bandwidth_mbps must be > 0 or None, got {bandwidth_mbps}")
        self.target = (target_host, target_port)
        self.delay_s = delay_ms / 1000.0
        # bytes per second, or None for unlimited
        self.rate = bandwidth_mbps * 1e6 / 8 if bandwidth_mbps else None
        self.listen_host = listen_host
        self._listen_port = listen_port
        self._port: int | None = None
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self._up = threading.Event()  # cleared while the link is cut
        self._up.set()
        self._threads: list[threading.Thread] = []
        self._socks: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.connections = 0  # accepted so far

    # ---------------------------------------------------------------- public API

    def start(self) -> int:
        """Listen and start forwarding in background threads; returns the port."""
        if self._listener is not None:
            return self.port
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.listen_host, self._listen_port))
        listener.listen(64)
        # accept() polls so that stop() is noticed; closing a socket does not reliably
        # wake a thread blocked in accept() on it.
        listener.settimeout(0.1)
        self._listener = listener
        self._port = listener.getsockname()[1]
        self._spawn(self._accept_loop, "netem-accept")
        return self._port

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("DelayProxy not started")
        return self._port

    @property
    def url(self) -> str:
        """``mqtt://host:port`` of the proxy (TLS passes through: use mqtts:// yourself)."""
        return f"mqtt://{self.listen_host}:{self.port}"

    def cut(self) -> None:
        """Cut the link: nothing crosses it, either way, on any connection (new ones too)
        until ``restore()``. What is sent meanwhile waits and then arrives late, as TCP
        holds and resends it over a real cut; connections stay up unless an end gives up
        (an MQTT keep-alive) and closes, and that close waits for the restore too."""
        self._up.clear()

    def restore(self) -> None:
        """End a ``cut()``: what waited is delivered, in order."""
        self._up.set()

    @property
    def is_cut(self) -> bool:
        return not self._up.is_set()

    def stop(self) -> None:
        """Stop listening and drop every connection (both sides see a reset/EOF)."""
        self._stop.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        for t in list(self._threads):
            if t is not threading.current_thread():
                t.join(timeout=5)
        for s in socks:
            with contextlib.suppress(OSError):
                s.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        rate = f", {self.rate * 8 / 1e6:g} Mbit/s" if self.rate else ""
        return f"DelayProxy(:{self._port} -> {self.target}, {self.delay_s * 1000:g} ms{rate})"

    # ---------------------------------------------------------------- internals

    def _spawn(self, target: Callable[..., object], name: str, *args: object) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()]
            self._threads.append(t)
        t.start()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # listener closed by stop()
            client.settimeout(None)
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()  # the target is down: the client sees the refusal as EOF
                continue
            for s in (client, upstream):
                # Our own Nagle would add the very stall the emulator must not invent.
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._socks.update((client, upstream))
                self.connections += 1
            pair = _Pair(client, upstream)
            for src, dst, name in ((client, upstream, "up"), (upstream, client, "down")):
                link: queue.Queue[tuple[float, bytes]] = queue.Queue(maxsize=_BUFFER // _CHUNK)
                self._spawn(self._reader, f"netem-{name}-read", src, link, pair)
                self._spawn(self._writer, f"netem-{name}-write", dst, link, pair)

    def _reader(
        self, src: socket.socket, link: queue.Queue[tuple[float, bytes]], pair: _Pair
    ) -> None:
        # Stamps each chunk with its arrival time at the far end of the emulated link.
        busy_until = 0.0  # when the emulated wire finishes the previous chunk
        while True:
            try:
                data = src.recv(_CHUNK)
            except OSError:
                data = _EOF
            now = time.monotonic()
            if data and self.rate:
                start = max(now, busy_until)
                busy_until = start + len(data) / self.rate
                due = busy_until + self.delay_s
            else:
                due = max(now, busy_until) + self.delay_s
            # put() blocks when the link is full: that is the backpressure on the sender.
            while not (self._stop.is_set() or pair.dead.is_set()):
                try:
                    link.put((due, data), timeout=0.1)
                    break
                except queue.Full:
                    continue
            if not data or self._stop.is_set() or pair.dead.is_set():
                return

    def _writer(
        self, dst: socket.socket, link: queue.Queue[tuple[float, bytes]], pair: _Pair
    ) -> None:
        while not (self._stop.is_set() or pair.dead.is_set()):
            try:
                due, data = link.get(timeout=0.1)
            except queue.Empty:
                continue
            wait = due - time.monotonic()
            if wait > 0 and self._stop.wait(wait):
                break
            while not (self._up.wait(0.05) or self._stop.is_set() or pair.dead.is_set()):
                pass  # the link is cut: hold the chunk
            if self._stop.is_set() or pair.dead.is_set():
                break
            if not data:
                # Pass the half-close on, as a real link would deliver the FIN.
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)
                break
            try:
                dst.sendall(data)
            except OSError:
                # The far side is gone: a real connection would be reset both ways.
                pair.abort()
                break
        pair.direction_done(self)


class _Pair:
    """Both sockets of one proxied connection; closed once both directions finish."""

    def __init__(self, a: socket.socket, b: socket.socket) -> None:
        self.socks = (a, b)
        self.dead = threading.Event()
        self._left = 2
        self._lock = threading.Lock()

    def abort(self) -> None:
        self.dead.set()
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def direction_done(self, proxy: DelayProxy) -> None:
        with self._lock:
            self._left -= 1
            last = self._left == 0
        if not last:
            return
        with proxy._lock:
            proxy._socks.difference_update(self.socks)
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.close()
