"""RuntimeService streaming RPCs (Exec, Attach, PortForward): URLs on the streaming server.

Each RPC checks that its target exists and can be streamed to *now* (a
container RUNNING, a pod sandbox READY; Attach with stdin only to a container
created with stdin), so the caller hears NOT_FOUND or
FAILED_PRECONDITION at once, then parks the request on the streaming server
under a single-use token and returns the URL.  The backend checks again when
the client connects.
"""

from __future__ import annotations

from typing import TypeAlias

import grpc

from moorage.core.errors import FailedPrecondition
from moorage.cri import validate
from moorage.cri.api import api_pb2 as pb
from moorage.cri.streaming.server import AttachRequest, ExecRequest, PortForwardRequest, StreamingServer
from moorage.runtime.records import SandboxState
from moorage.runtime.service import Runtime

Ctx: TypeAlias = grpc.aio.ServicerContext  # Any to mypy: grpc ships no stubs



class StreamingRPCs:
    """Exec, Attach and PortForward of the RuntimeService: checks on ``runtime``, URLs from ``server``."""

    def __init__(self, runtime: Runtime, server: StreamingServer) -> None:
        self.rt = runtime
        self.server = server

    async def Exec(self, request: pb.ExecRequest, context: Ctx) -> pb.ExecResponse:
        validate.object_id(request.container_id, "container_id")
        validate.command(request.cmd)
        rec = self.rt.running_container(request.container_id)
        url = self.server.get_exec_url(ExecRequest(
            container_id=rec.id, cmd=list(request.cmd), tty=request.tty, stdin=request.stdin,
            stdout=request.stdout, stderr=request.stderr))
        return pb.ExecResponse(url=url)

    async def Attach(self, request: pb.AttachRequest, context: Ctx) -> pb.AttachResponse:
        validate.object_id(request.container_id, "container_id")
        rec = self.rt.attachable_container(request.container_id, stdin=request.stdin)
        url = self.server.get_attach_url(AttachRequest(
            container_id=rec.id, tty=request.tty, stdin=request.stdin, stdout=request.stdout,
            stderr=request.stderr))
        return pb.AttachResponse(url=url)

    async def PortForward(self, request: pb.PortForwardRequest, context: Ctx) -> pb.PortForwardResponse:
        validate.object_id(request.pod_sandbox_id, "pod_sandbox_id")
        validate.ports(request.port)
        sb = self.rt.get_sandbox(request.pod_sandbox_id)
        if sb.status.state != SandboxState.READY:
            raise FailedPrecondition(f"pod sandbox {sb.id} is not ready; cannot forward ports to it")
        url = self.server.get_portforward_url(PortForwardRequest(sandbox_id=sb.id, ports=list(request.port)))
        return pb.PortForwardResponse(url=url)
