"""systemd service notifications (the ``sd_notify`` datagram protocol), without libsystemd.

The protocol: the service manager puts the path of a unix datagram socket in
``NOTIFY_SOCKET`` (a leading ``@`` names an abstract socket); the service sends
newline-separated ``KEY=VALUE`` assignments in one datagram per message
(``READY=1``, ``STATUS=...``, ``STOPPING=1``, ``WATCHDOG=1``, ``RELOADING=1``).
``WATCHDOG_USEC`` asks for a ``WATCHDOG=1`` at least that often; ``WATCHDOG_PID``,
when set, names the one process it is meant for.

Without ``NOTIFY_SOCKET`` every call is a no-op, so the daemon runs the same
under systemd, under a shell or under a test.  Sending never raises: systemd
missing or wedged must not take the runtime down (it only logs).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, MutableMapping

log = logging.getLogger("moorage.notify")

# The variables are ours alone: removed from the environment once read, so that no child
# (conmon, runc, CNI plugins, helpers) talks to systemd in our name (as sd_notify's
# unset_environment; runc would otherwise proxy a container's notifications).
ENV_KEYS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")

# A wedged service manager must not stall the event loop for long; systemd drains its
# socket at once, so a full queue for a second means a message is lost anyway.
_SEND_TIMEOUT = 1.0


def socket_address(value: str) -> str | None:
    """The ``sendto`` address for a ``NOTIFY_SOCKET`` value, or None when it is not one we can use.

    ``@name`` is the abstract name ``\\0name``; otherwise an absolute path.  systemd also knows
    ``vsock:`` addresses (for VMs), which a node runtime never gets.
    """
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def watchdog_interval(env: MutableMapping[str, str], pid: int) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``WATCHDOG_USEC``, as systemd advises), or None.

    None when no watchdog is asked for, the value is not a positive integer, or ``WATCHDOG_PID``
    names another process (the watchdog is then meant for someone else).
    """
    raw = env.get("WATCHDOG_USEC", "")
    try:
        usec = int(raw)
    except ValueError:
        return None
    if usec <= 0:
        return None
    owner = env.get("WATCHDOG_PID", "")
    if owner:
        try:
            if int(owner) != pid:
                return None
        except ValueError:
            return None
    return usec / 2 / 1_000_000


class Notifier:
    """Sends notifications to the service manager; every method is a no-op without a socket."""

    def __init__(self, address: str | None = None, watchdog: float | None = None) -> None:
        self.address = address  # as passed to sendto (abstract names start with NUL)
        self.watchdog = watchdog  # seconds between pings, or None

    @classmethod
    def from_env(cls, env: MutableMapping[str, str] | None = None, pid: int | None = None,
                 unset: bool = True) -> Notifier:
        """Read (and by default remove) ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``."""
        env = os.environ if env is None else env
        pid = os.getpid() if pid is None else pid
        raw = env.get("NOTIFY_SOCKET", "")
        address = socket_address(raw) if raw else None
        if raw and address is None:
            log.warning("ignoring NOTIFY_SOCKET=%r: not an absolute path or @abstract name", raw)
        watchdog = watchdog_interval(env, pid) if address else None
        if unset:
            for k in ENV_KEYS:
                env.pop(k, None)
        return cls(address, watchdog)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *assignments: str) -> bool:
        """One datagram of ``KEY=VALUE`` lines; True when it was handed to the socket."""
        if self.address is None or not assignments:
            return False
        for a in assignments:
            if "=" not in a or "\n" in a:
                raise ValueError(f"not one KEY=VALUE assignment: {a!r}")
        data = "\n".join(assignments).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.settimeout(_SEND_TIMEOUT)
                s.sendto(data, self.address)
        except OSError as e:
            log.warning("cannot notify the service manager: %s", e)
            return False
        return True

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={_one_line(text)}")

    def ready(self, status: str = "") -> bool:
        return self.send("READY=1", *([f"STATUS={_one_line(status)}"] if status else []))

    def stopping(self, status: str = "") -> bool:
        return self.send("STOPPING=1", *([f"STATUS={_one_line(status)}"] if status else []))

    def reloading(self, status: str = "") -> bool:
        """Begin a reload (``Type=notify-reload`` wants the monotonic clock with it); send ``ready()`` after."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}",
                         *([f"STATUS={_one_line(status)}"] if status else []))

    def ping(self) -> bool:
        return self.send("WATCHDOG=1")

    async def heartbeat(self, status: Callable[[], str] | None = None, refresh: float = 15.0) -> None:
        """Until cancelled: ``WATCHDOG=1`` every ``watchdog`` seconds, and ``status()`` re-sent when it changed.

        Runs on the event loop on purpose: a ping proves that the loop still turns, which is
        what a hung daemon stops doing.
        """
        if not self.enabled or (self.watchdog is None and status is None):
            return
        period = min(self.watchdog, refresh) if self.watchdog is not None else refresh
        last_status = ""
        next_ping = time.monotonic()
        while True:
            now = time.monotonic()
            if self.watchdog is not None and now >= next_ping:
                self.ping()
                next_ping = now + self.watchdog
            if status is not None:
                text = ""
                with contextlib.suppress(Exception):  # a status is a nicety; never stop the pings for it
                    text = status()
                if text and text != last_status:
                    self.status(text)
                    last_status = text
            await asyncio.sleep(period)


def _one_line(text: str) -> str:
    return " ".join(text.split())
