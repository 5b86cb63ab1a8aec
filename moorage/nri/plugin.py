"""One NRI plugin connection, as the runtime sees it.

The plugin dials the NRI socket (or is handed one end of a socketpair when
moorage launches it), registers on the Runtime service and is then configured
and synchronized by the runtime (adaptation.py).  Every call to the plugin has a
deadline; a plugin that misses it, or whose connection breaks, is ``PluginLost``
and gets dropped; a plugin that answers with an error ``PluginRejected`` the
request.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from moorage.nri import mux
from moorage.nri.api import api_pb2 as nri
from moorage.nri.convert import clean_text
from moorage.nri.transport import (
    FAILED_PRECONDITION,
    UNIMPLEMENTED,
    ConnectionLost,
    Endpoint,
    RPCError,
)

log = logging.getLogger("moorage.nri")

RUNTIME_SERVICE = "nri.pkg.api.v1alpha1.Runtime"
PLUGIN_SERVICE = "nri.pkg.api.v1alpha1.Plugin"
#: an NRI plugin index: two digits; plugins are consulted in ascending index order
IDX_RE = re.compile(r"^[0-9]{2}$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

M = TypeVar("M", bound=Message)


class PluginLost(Exception):
    """The plugin did not answer in time, or its connection closed: it is dropped."""


class PluginRejected(Exception):
    """The plugin answered the request with an error."""


#: what a plugin asks on its own: (plugin, request) -> containers that failed to update
UpdateHandler = Callable[["Plugin", nri.UpdateContainersRequest], Awaitable[list[nri.ContainerUpdate]]]


class Plugin:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, on_update: UpdateHandler, *,
                 name: str = "", idx: str = "", launched: bool = False) -> None:
        self.name, self.idx = name, idx
        self.launched = launched
        self.events = 0  # subscribed events, one bit per nri.Event (bit e-1)
        self.ready = False  # synchronized: gets events
        self.registered = asyncio.Event()
        self._on_update = on_update
        self.endpoint = Endpoint(reader, writer, client_conn=mux.PLUGIN_SERVICE_CONN,
                                 server_conn=mux.RUNTIME_SERVICE_CONN, handler=self._serve, name="nri plugin")
        self.task: asyncio.Task[None] | None = None

    @property
    def qualified(self) -> str:
        return f"{self.idx}-{self.name}" if self.name else "(unregistered plugin)"

    def start(self) -> None:
        self.task = asyncio.ensure_future(self.endpoint.run())

    def subscribed(self, event: int) -> bool:
        return bool(self.events & (1 << (event - 1)))

    def close(self, reason: str) -> None:
        self.endpoint.close(reason)

    async def _serve(self, service: str, method: str, payload: bytes) -> bytes:
        if service != RUNTIME_SERVICE:
            raise RPCError(UNIMPLEMENTED, f"service {clean_text(service, 100)} is not served by the runtime")
        try:
            if method == "RegisterPlugin":
                req = nri.RegisterPluginRequest.FromString(payload)
                self._register(req)
                return nri.Empty().SerializeToString()
            if method == "UpdateContainers":
                upd = nri.UpdateContainersRequest.FromString(payload)
                if not self.ready:
                    raise RPCError(FAILED_PRECONDITION, "plugin is not synchronized yet; UpdateContainers refused")
                failed = await self._on_update(self, upd)
                return nri.UpdateContainersResponse(failed=failed).SerializeToString()
        except DecodeError as e:
            raise RPCError(FAILED_PRECONDITION, f"undecodable {method} request: {e}") from e
        raise RPCError(UNIMPLEMENTED, f"method {clean_text(method, 100)} is not served by the runtime")

    def _register(self, req: nri.RegisterPluginRequest) -> None:
        if self.registered.is_set():
            raise RPCError(FAILED_PRECONDITION, f"plugin {self.qualified} is already registered")
        if self.launched:
            # moorage named it from its file name; what it says must not contradict that
            if (req.plugin_name and req.plugin_name != self.name) or (req.plugin_idx and req.plugin_idx != self.idx):
                raise RPCError(FAILED_PRECONDITION, f"plugin launched as {self.qualified} registers as "
                                                    f"{clean_text(req.plugin_idx, 8)}-{clean_text(req.plugin_name, 64)}")
        else:
            if not NAME_RE.match(req.plugin_name):
                raise RPCError(FAILED_PRECONDITION, f"plugin name {clean_text(req.plugin_name, 64)!r} is not valid "
                                                    "(letters, digits, '_', '.', '-')")
            if not IDX_RE.match(req.plugin_idx):
                raise RPCError(FAILED_PRECONDITION, f"plugin index {clean_text(req.plugin_idx, 8)!r} is not two digits")
            self.name, self.idx = req.plugin_name, req.plugin_idx
        log.info("NRI plugin registering", extra={"fields": {"plugin": self.qualified,
                                                              "nri_version": clean_text(req.NRI_version, 40)}})
        self.registered.set()

    async def call(self, method: str, req: Message, resp_type: type[M], timeout: float) -> M:
        try:
            payload = await self.endpoint.call(PLUGIN_SERVICE, method, req.SerializeToString(), timeout)
        except TimeoutError as e:
            raise PluginLost(f"plugin {self.qualified} did not answer {method} within {timeout:g}s") from e
        except ConnectionLost as e:
            raise PluginLost(f"plugin {self.qualified} disconnected during {method} ({e})") from e
        except RPCError as e:
            if e.code == UNIMPLEMENTED:
                return resp_type()  # a plugin may leave out what it does not handle
            raise PluginRejected(f"NRI plugin {self.qualified} failed {method}: {clean_text(e.message)}") from e
        try:
            return resp_type.FromString(payload)
        except DecodeError as e:
            raise PluginLost(f"plugin {self.qualified} sent an undecodable {method} answer") from e
