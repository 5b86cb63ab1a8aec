"""A small NRI plugin of moorage's own, for tests: ttrpc over NRI's multiplexer on a real socket.

``NRIPlugin`` runs its own asyncio loop in a thread, so blocking tests (which
drive the daemon over gRPC) can use it: it dials the daemon's NRI socket,
registers, answers Configure with the events it subscribes to and Synchronize,
records every request it gets, and answers each with what a per-method handler
returns (an empty answer by default).  A handler may be async (to block), may
raise ``RPCError`` (to fail the request), or may call ``crash()`` (to drop the
connection mid-request).  Run as ``python -m moorage.testing.nri`` it is a
pre-installed plugin: it takes its socket from ``NRI_PLUGIN_SOCKET`` and appends
one JSON line per request to the file its config names.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from moorage.nri import mux
from moorage.nri.api import api_pb2 as nri
from moorage.nri.plugin import PLUGIN_SERVICE, RUNTIME_SERVICE
from moorage.nri.transport import UNIMPLEMENTED, Endpoint, RPCError

__all__ = ["ALL_EVENTS", "NRIPlugin", "RPCError", "nri"]

#: request and response types of the Plugin service, by method
METHODS: dict[str, tuple[type[Message], type[Message]]] = {
    "Configure": (nri.ConfigureRequest, nri.ConfigureResponse),
    "Synchronize": (nri.SynchronizeRequest, nri.SynchronizeResponse),
    "Shutdown": (nri.Empty, nri.Empty),
    "RunPodSandbox": (nri.RunPodSandboxRequest, nri.RunPodSandboxResponse),
    "UpdatePodSandbox": (nri.UpdatePodSandboxRequest, nri.UpdatePodSandboxResponse),
    "PostUpdatePodSandbox": (nri.PostUpdatePodSandboxRequest, nri.PostUpdatePodSandboxResponse),
    "StopPodSandbox": (nri.StopPodSandboxRequest, nri.StopPodSandboxResponse),
    "RemovePodSandbox": (nri.RemovePodSandboxRequest, nri.RemovePodSandboxResponse),
    "CreateContainer": (nri.CreateContainerRequest, nri.CreateContainerResponse),
    "PostCreateContainer": (nri.PostCreateContainerRequest, nri.PostCreateContainerResponse),
    "StartContainer": (nri.StartContainerRequest, nri.StartContainerResponse),
    "PostStartContainer": (nri.PostStartContainerRequest, nri.PostStartContainerResponse),
    "UpdateContainer": (nri.UpdateContainerRequest, nri.UpdateContainerResponse),
    "PostUpdateContainer": (nri.PostUpdateContainerRequest, nri.PostUpdateContainerResponse),
    "StopContainer": (nri.StopContainerRequest, nri.StopContainerResponse),
    "RemoveContainer": (nri.RemoveContainerRequest, nri.RemoveContainerResponse),
    "StateChange": (nri.StateChangeEvent, nri.Empty),
    "ValidateContainerAdjustment": (nri.ValidateContainerAdjustmentRequest, nri.ValidateContainerAdjustmentResponse),
}
ALL_EVENTS = tuple(range(nri.RUN_POD_SANDBOX, nri.LAST))

#: a handler: request -> answer (None: the empty answer); may be a coroutine function
Handler = Callable[[Any], "Message | Awaitable[Message | None] | None"]


class NRIPlugin:
    def __init__(self, socket_path: str = "", name: str = "test", idx: str = "50", *,
                 events: Iterable[int] = ALL_EVENTS, handlers: dict[str, Handler] | None = None,
                 sock: socket.socket | None = None) -> None:
        self.socket_path, self.name, self.idx = socket_path, name, idx
        self.events = tuple(events)
        self.handlers: dict[str, Handler] = dict(handlers or {})
        self.requests: list[tuple[str, Any]] = []  # (method, request) in arrival order
        self.config = ""
        self._sock = sock
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"nri-plugin-{name}", daemon=True)
        self._endpoint: Endpoint | None = None
        self._synced = threading.Event()
        self._task: asyncio.Task[None] | None = None

    # -- life -------------------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> NRIPlugin:
        """Connect, register and wait until the runtime has synchronized this plugin."""
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._connect(), self._loop).result(timeout)
        if not self._synced.wait(timeout):
            raise TimeoutError(f"NRI plugin {self.idx}-{self.name} was not synchronized within {timeout}s")
        return self

    async def _connect(self) -> None:
        if self._sock is not None:
            reader, writer = await asyncio.open_unix_connection(sock=self._sock)
        else:
            reader, writer = await asyncio.open_unix_connection(self.socket_path)
        ep = Endpoint(reader, writer, client_conn=mux.RUNTIME_SERVICE_CONN, server_conn=mux.PLUGIN_SERVICE_CONN,
                      handler=self._serve, name=f"test plugin {self.name}")
        self._endpoint = ep
        self._task = asyncio.ensure_future(ep.run())
        await ep.call(RUNTIME_SERVICE, "RegisterPlugin", nri.RegisterPluginRequest(
            plugin_name=self.name, plugin_idx=self.idx, NRI_version="v0.12.1").SerializeToString(), 5.0)

    def close(self) -> None:
        """Disconnect (as a plugin that exits) and stop the thread."""
        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(5)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        if not self._thread.is_alive() and not self._loop.is_closed():
            self._loop.close()

    async def _close(self) -> None:
        if self._endpoint is not None:
            self._endpoint.close("test plugin closed")
        if self._task is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await self._task

    def crash(self) -> None:
        """Drop the connection at once (from a handler: a plugin dying mid-request)."""
        if self._endpoint is not None:
            self._endpoint.close("test plugin crashed")

    @property
    def connected(self) -> bool:
        return self._endpoint is not None and not self._endpoint.closed

    # -- serving the runtime's requests ---------------------------------------------------------------

    async def _serve(self, service: str, method: str, payload: bytes) -> bytes:
        if service != PLUGIN_SERVICE or method not in METHODS:
            raise RPCError(UNIMPLEMENTED, f"{service}/{method}")
        req_type, resp_type = METHODS[method]
        req = req_type.FromString(payload)
        with self._lock:
            self.requests.append((method, req))
        if method == "Configure":
            self.config = req.config  # type: ignore[attr-defined]
        handler = self.handlers.get(method)
        resp: Any = None
        if handler is not None:
            resp = handler(req)
            if asyncio.iscoroutine(resp) or isinstance(resp, asyncio.Future):
                resp = await resp
        if resp is None:
            resp = resp_type()
            if method == "Configure":
                mask = 0
                for e in self.events:
                    mask |= 1 << (e - 1)
                resp.events = mask
        if method == "Synchronize" and not req.more:  # type: ignore[attr-defined]
            self._loop.call_soon(self._synced.set)
        out: bytes = resp.SerializeToString()
        return out

    # -- what tests read and ask ------------------------------------------------------------------------

    def seen(self, method: str) -> list[Any]:
        with self._lock:
            return [r for m, r in self.requests if m == method]

    def methods(self) -> list[str]:
        with self._lock:
            return [m for m, _ in self.requests]

    def wait_for(self, method: str, pred: Callable[[Any], bool] = lambda r: True, timeout: float = 10.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            for r in self.seen(method):
                if pred(r):
                    return r
            if time.monotonic() > deadline:
                raise TimeoutError(f"no matching {method} within {timeout}s; got {self.methods()}")
            time.sleep(0.02)

    def update_containers(self, update: Iterable[nri.ContainerUpdate] = (),
                          evict: Iterable[nri.ContainerEviction] = (), timeout: float = 30.0) -> list[Any]:
        """Ask the runtime for unsolicited updates and evictions: the updates that failed."""
        assert self._endpoint is not None
        payload = nri.UpdateContainersRequest(update=list(update), evict=list(evict)).SerializeToString()
        fut = asyncio.run_coroutine_threadsafe(
            self._endpoint.call(RUNTIME_SERVICE, "UpdateContainers", payload, timeout), self._loop)
        return list(nri.UpdateContainersResponse.FromString(fut.result(timeout + 1)).failed)


async def hang(req: Any) -> None:
    """A handler that never answers."""
    await asyncio.Event().wait()


def _main() -> int:
    """Run as a pre-installed plugin: socket from the environment, record file from the config."""
    fd = int(os.environ["NRI_PLUGIN_SOCKET"])
    sock = socket.socket(fileno=fd)
    plugin = NRIPlugin(name=os.environ["NRI_PLUGIN_NAME"], idx=os.environ["NRI_PLUGIN_IDX"], sock=sock)

    def record(method: str) -> Handler:
        def handler(req: Any) -> None:
            path = plugin.config.strip()
            if path:
                with open(path, "a") as f:
                    f.write(json.dumps({"method": method, "env": dict(os.environ),
                                        "request": MessageToDict(req)}) + "\n")
        return handler

    plugin.handlers = {m: record(m) for m in METHODS if m not in ("Configure",)}
    plugin.start()
    while plugin.connected:
        time.sleep(0.1)
    plugin.close()
    return 0


if __name__ == "__main__":
    sys.exit(_main())
