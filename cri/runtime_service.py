"""CRI RuntimeService: translates protobuf to calls on ``runtime/`` objects."""

from __future__ import annotations

import json

from cri import config as configmod
from cri.api import api_pb2 as pb

RUNTIME_NAME = "moorage"


class RuntimeServicer:
    def __init__(self, cfg: configmod.Config, network_status=None) -> None:
        self.cfg = cfg
        # network_status() -> (ready, reason, message); replaced once CNI is wired in.
        self.network_status = network_status or (
            lambda: (False, "NetworkPluginNotReady", "moorage: pod networking (CNI) is not set up")
        )

    async def Version(self, request: pb.VersionRequest, context) -> pb.VersionResponse:
        from cri.server import CRI_API_VERSION, VERSION

        return pb.VersionResponse(
            version="0.1.0", runtime_name=RUNTIME_NAME, runtime_version=VERSION, runtime_api_version=CRI_API_VERSION
        )

    async def Status(self, request: pb.StatusRequest, context) -> pb.StatusResponse:
        net_ok, net_reason, net_msg = self.network_status()
        conditions = [
            pb.RuntimeCondition(type="RuntimeReady", status=True),
            pb.RuntimeCondition(type="NetworkReady", status=net_ok, reason="" if net_ok else net_reason,
                                message="" if net_ok else net_msg),
        ]
        info = {}
        if request.verbose:
            info["config"] = json.dumps(configmod.as_dict(self.cfg), sort_keys=True)
        handlers = [
            pb.RuntimeHandler(name=name, features=pb.RuntimeHandlerFeatures(recursive_read_only_mounts=False,
                                                                             user_namespaces=False))
            for name in sorted(self.cfg.runtime.handlers)
        ]
        return pb.StatusResponse(
            status=pb.RuntimeStatus(conditions=conditions), info=info, runtime_handlers=handlers,
            features=pb.RuntimeFeatures(supplemental_groups_policy=False),
        )

    async def RuntimeConfig(self, request: pb.RuntimeConfigRequest, context) -> pb.RuntimeConfigResponse:
        driver = pb.SYSTEMD if self.cfg.runtime.cgroup_driver == "systemd" else pb.CGROUPFS
        return pb.RuntimeConfigResponse(linux=pb.LinuxRuntimeConfiguration(cgroup_driver=driver))
