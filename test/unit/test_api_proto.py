"""Shape of the generated CRI v1 API: service names, RPC lists, streaming
flags and wire-critical field numbers, read from the descriptors."""

import pytest

from moorage.cri.api import api_pb2, api_pb2_grpc

RUNTIME_RPCS = [
    "Version",
    "RunPodSandbox",
    "StopPodSandbox",
    "RemovePodSandbox",
    "PodSandboxStatus",
    "ListPodSandbox",
    "StreamPodSandboxes",
    "CreateContainer",
    "StartContainer",
    "StopContainer",
    "RemoveContainer",
    "ListContainers",
    "StreamContainers",
    "ContainerStatus",
    "UpdateContainerResources",
    "ReopenContainerLog",
    "ExecSync",
    "Exec",
    "Attach",
    "PortForward",
    "ContainerStats",
    "ListContainerStats",
    "StreamContainerStats",
    "PodSandboxStats",
    "ListPodSandboxStats",
    "StreamPodSandboxStats",
    "UpdateRuntimeConfig",
    "Status",
    "CheckpointContainer",
    "CheckpointPod",
    "RestorePod",
    "GetContainerEvents",
    "ListMetricDescriptors",
    "ListPodSandboxMetrics",
    "StreamPodSandboxMetrics",
    "RuntimeConfig",
    "UpdatePodSandboxResources",
]

IMAGE_RPCS = [
    "ListImages",
    "StreamImages",
    "ImageStatus",
    "PullImage",
    "RemoveImage",
    "ImageFsInfo",
]

# RPCs whose response is a server stream; none takes a client stream.
SERVER_STREAMING = {
    "StreamPodSandboxes",
    "StreamContainers",
    "StreamContainerStats",
    "StreamPodSandboxStats",
    "GetContainerEvents",
    "StreamPodSandboxMetrics",
    "StreamImages",
}


def _service(name):
    return api_pb2.DESCRIPTOR.services_by_name[name]


def test_package_and_service_full_names():
    assert api_pb2.DESCRIPTOR.package == "runtime.v1"
    assert _service("RuntimeService").full_name == "runtime.v1.RuntimeService"
    assert _service("ImageService").full_name == "runtime.v1.ImageService"
    assert set(api_pb2.DESCRIPTOR.services_by_name) == {"RuntimeService", "ImageService"}


@pytest.mark.parametrize(
    "service,expected", [("RuntimeService", RUNTIME_RPCS), ("ImageService", IMAGE_RPCS)]
)
def test_rpc_lists_are_complete(service, expected):
    names = [m.name for m in _service(service).methods]
    assert names == expected


@pytest.mark.parametrize(
    "service,rpc",
    [("RuntimeService", r) for r in RUNTIME_RPCS] + [("ImageService", r) for r in IMAGE_RPCS],
)
def test_streaming_flags(service, rpc):
    m = _service(service).methods_by_name[rpc]
    assert m.client_streaming is False
    assert m.server_streaming is (rpc in SERVER_STREAMING)


def test_container_events_rpc_types():
    m = _service("RuntimeService").methods_by_name["GetContainerEvents"]
    assert m.input_type.full_name == "runtime.v1.GetEventsRequest"
    assert m.output_type.full_name == "runtime.v1.ContainerEventResponse"


def test_grpc_stubs_and_method_paths():
    for cls in (
        "RuntimeServiceStub",
        "RuntimeServiceServicer",
        "ImageServiceStub",
        "ImageServiceServicer",
    ):
        assert hasattr(api_pb2_grpc, cls)
    assert hasattr(api_pb2_grpc, "add_RuntimeServiceServicer_to_server")
    assert hasattr(api_pb2_grpc, "add_ImageServiceServicer_to_server")
    for rpc in RUNTIME_RPCS:
        assert callable(getattr(api_pb2_grpc.RuntimeServiceServicer, rpc))
    for rpc in IMAGE_RPCS:
        assert callable(getattr(api_pb2_grpc.ImageServiceServicer, rpc))


def _num(message, field):
    return getattr(api_pb2, message).DESCRIPTOR.fields_by_name[field].number


@pytest.mark.parametrize(
    "message,field,number",
    [
        ("VersionRequest", "version", 1),
        ("VersionResponse", "runtime_api_version", 4),
        ("PodSandboxConfig", "metadata", 1),
        ("PodSandboxConfig", "log_directory", 3),
        ("PodSandboxConfig", "linux", 8),
        ("RunPodSandboxRequest", "config", 1),
        ("RunPodSandboxRequest", "runtime_handler", 2),
        ("CreateContainerRequest", "pod_sandbox_id", 1),
        ("CreateContainerRequest", "config", 2),
        ("CreateContainerRequest", "sandbox_config", 3),
        ("ContainerConfig", "metadata", 1),
        ("ContainerConfig", "image", 2),
        ("ContainerConfig", "command", 3),
        ("ContainerConfig", "args", 4),
        ("ContainerConfig", "envs", 6),
        ("ContainerConfig", "mounts", 7),
        ("ContainerConfig", "log_path", 11),
        ("ContainerConfig", "linux", 15),
        ("ExecSyncRequest", "container_id", 1),
        ("ExecSyncRequest", "cmd", 2),
        ("ExecSyncRequest", "timeout", 3),
        ("ExecSyncResponse", "exit_code", 3),
        ("StopContainerRequest", "timeout", 2),
        ("ContainerStatus", "exit_code", 7),
        ("PullImageRequest", "image", 1),
        ("PullImageRequest", "auth", 2),
        ("PullImageRequest", "sandbox_config", 3),
        ("ImageFsInfoResponse", "image_filesystems", 1),
        ("ImageFsInfoResponse", "container_filesystems", 2),
        ("ContainerEventResponse", "container_event_type", 2),
        ("StatusResponse", "runtime_handlers", 3),
        ("StatusResponse", "features", 4),
    ],
)
def test_field_numbers(message, field, number):
    assert _num(message, field) == number


def test_field_types_and_maps():
    cfg = api_pb2.ContainerConfig.DESCRIPTOR
    # ContainerConfig.image is an ImageSpec message, annotations a string map.
    assert cfg.fields_by_name["image"].message_type.full_name == "runtime.v1.ImageSpec"
    ann = cfg.fields_by_name["annotations"]
    assert ann.message_type.GetOptions().map_entry
    msg = api_pb2.ContainerConfig(annotations={"a": "b"}, labels={"k": "v"})
    assert api_pb2.ContainerConfig.FromString(msg.SerializeToString()).annotations["a"] == "b"


def test_enum_values():
    assert api_pb2.ContainerState.Value("CONTAINER_CREATED") == 0
    assert api_pb2.ContainerState.Value("CONTAINER_RUNNING") == 1
    assert api_pb2.ContainerState.Value("CONTAINER_EXITED") == 2
    assert api_pb2.ContainerState.Value("CONTAINER_UNKNOWN") == 3
    assert api_pb2.PodSandboxState.Value("SANDBOX_READY") == 0
    assert api_pb2.NamespaceMode.Value("TARGET") == 3
    assert api_pb2.ContainerEventType.Value("CONTAINER_DELETED_EVENT") == 3
    assert api_pb2.SecurityProfile.ProfileType.Value("Localhost") == 2


def test_wire_bytes_for_exec_sync():
    # field 1 (string) and field 3 (varint) as they appear on the wire
    data = api_pb2.ExecSyncRequest(container_id="c", timeout=5).SerializeToString()
    assert data == b"\x0a\x01c\x18\x05"
