"""Image config fields are checked at pull/import time (images/oci.py), and the spec builder
applies image env as containerd does (an entry without "=" unsets the variable)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from moorage.core.errors import InvalidArgument
from moorage.images import oci
from moorage.runtime import spec
from moorage.runtime.model import ContainerConfig, ImageConfig

DIFF = "sha256:" + "a" * 64


def config_bytes(**fields: Any) -> bytes:
    return json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [DIFF]},
                       "config": fields}).encode()


def refused(**fields: Any) -> str:
    with pytest.raises(InvalidArgument) as ei:
        oci.parse_config(config_bytes(**fields), "image config sha256:cfg of reg/x:1")
    msg = ei.value.message
    assert msg.startswith("image config sha256:cfg of reg/x:1: config."), msg
    assert len(msg) < 400
    return msg


def test_a_full_real_world_config_passes() -> None:
    cfg = oci.parse_config(config_bytes(
        Env=["PATH=/usr/bin", "EMPTY=", "UNSET_ME", "A==b"], Entrypoint=["/bin/sh", "-c"], Cmd=["echo hi"],
        WorkingDir="/srv", User="app:staff", StopSignal="SIGQUIT", Volumes={"/data": {}, "/cache": None},
        ExposedPorts={"80/tcp": {}, "53/udp": {}, "8080": {}, "9/SCTP": {}}, Labels={"a": "b"}), "cfg")
    assert cfg.env == ["PATH=/usr/bin", "EMPTY=", "UNSET_ME", "A==b"]
    for sig in ("TERM", "15", "SIGRTMIN+3", "RTMAX-2", "sigkill"):
        oci.parse_config(config_bytes(StopSignal=sig), "cfg")
    for user in ("0", "1000:1000", "nobody", "www-data:www-data"):
        oci.parse_config(config_bytes(User=user), "cfg")
    oci.parse_config(config_bytes(), "cfg")  # nothing set at all


@pytest.mark.parametrize(("fields", "words"), [
    ({"Env": ["A=1", "B=x\x00y"]}, "config.Env[1] contains a NUL character"),
    ({"Env": ["=value"]}, "config.Env[0] '=value' has no variable name"),
    ({"Env": [""]}, "config.Env[0] '' has no variable name"),
    ({"Env": "A=1"}, "config.Env must be a list of strings"),
    ({"Entrypoint": ["/bin/sh\x00", "-c"]}, "config.Entrypoint[0] contains a NUL character"),
    ({"Cmd": ["a", "b", "c\x00"]}, "config.Cmd[2] contains a NUL character"),
    ({"WorkingDir": "srv"}, "config.WorkingDir 'srv' is not an absolute path"),
    ({"WorkingDir": "/srv\x00"}, "config.WorkingDir contains a NUL character"),
    ({"User": "a:b:c"}, "config.User 'a:b:c' is not a user, uid, user:group or uid:gid"),
    ({"User": "root\n"}, "config.User 'root\\n' is not a user"),
    ({"User": ":0"}, "config.User ':0' is not a user"),
    ({"User": "4294967296"}, "is not a user"),
    ({"User": "u" * 300}, "config.User is 300 characters, over 256"),
    ({"User": "a\x00"}, "config.User contains a NUL character"),
    ({"StopSignal": "SIGFOO"}, "config.StopSignal 'SIGFOO' is not a signal"),
    ({"StopSignal": "99"}, "config.StopSignal '99' is not a signal"),
    ({"StopSignal": 9}, "config.StopSignal must be a string"),
    ({"Volumes": {"data": {}}}, "config.Volumes entry 'data' is not an absolute path"),
    ({"Volumes": ["/data"]}, "config.Volumes must map strings to objects"),
    ({"Volumes": {"/d\x00": {}}}, "config.Volumes contains a NUL character"),
    ({"ExposedPorts": {"http": {}}}, "config.ExposedPorts entry 'http' is not port[/tcp|udp|sctp]"),
    ({"ExposedPorts": {"70000/tcp": {}}}, "is not port[/tcp|udp|sctp]"),
    ({"ExposedPorts": {f"{p}/tcp": {} for p in range(1, oci.MAX_CONFIG_ENTRIES + 2)}},
     f"config.ExposedPorts has {oci.MAX_CONFIG_ENTRIES + 1} entries, over {oci.MAX_CONFIG_ENTRIES}"),
    ({"Labels": {"a": 1}}, "config.Labels must map strings to strings"),
    ({"Labels": {"": "x"}}, "config.Labels has an empty key"),
    ({"Labels": {"big": "x" * (oci.MAX_LABELS_BYTES + 1)}},
     f"config.Labels hold {oci.MAX_LABELS_BYTES + 4} bytes, over the {oci.MAX_LABELS_BYTES} byte limit"),
])
def test_unusable_fields_are_refused_naming_the_field(fields: dict[str, Any], words: str) -> None:
    assert words in refused(**fields)


def test_a_long_bad_value_is_not_echoed_whole() -> None:
    msg = refused(WorkingDir="x" * 100_000)
    assert len(msg) < 300 and "more characters" in msg


def test_config_json_nested_100000_deep_is_invalid_argument() -> None:
    data = b'{"rootfs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(InvalidArgument, match=r"^image config x nests more than 64 levels deep$"):
        oci.parse_config(data, "image config x")


def env_of(image_env: list[str], cri: tuple[tuple[str, str], ...] = ()) -> list[str]:
    cfg = ContainerConfig(image="reg/x:1", envs=list(cri))
    return spec.container_env(cfg, ImageConfig(env=image_env), hostname="h")


def test_image_env_without_equals_unsets_as_containerd_does() -> None:
    assert env_of(["PATH"]) == ["HOSTNAME=h"]                       # unsets the default PATH
    assert env_of(["A=1", "B=2", "A"]) == [f"PATH={spec.DEFAULT_PATH}", "HOSTNAME=h", "B=2"]
    assert env_of(["NEVER_SET"]) == [f"PATH={spec.DEFAULT_PATH}", "HOSTNAME=h"]  # dropped, not passed
    assert env_of(["A"], (("A", "from-cri"),))[-1] == "A=from-cri"  # CRI env still sets it


def test_a_stored_image_config_with_nul_is_invalid_argument_at_create() -> None:
    for image, field_name in ((ImageConfig(entrypoint=["/bin/sh\x00"]), "Entrypoint"),
                              (ImageConfig(cmd=["x\x00"]), "Cmd"), (ImageConfig(env=["A=\x00"]), "Env"),
                              (ImageConfig(working_dir="/a\x00"), "WorkingDir"),
                              (ImageConfig(user="a\x00"), "User")):
        with pytest.raises(InvalidArgument, match=rf"^image reg/x:1: config.{field_name} contains a NUL"):
            spec.check_image_strings(image, "reg/x:1")
    spec.check_image_strings(ImageConfig(entrypoint=["/bin/sh"], env=["A=1"]), "reg/x:1")


def test_the_platforms_an_index_offers_are_listed_bounded_and_escaped() -> None:
    from moorage.images.platform import MAX_PLATFORMS_SHOWN, available_platforms
    d = "sha256:" + "b" * 64
    many = [oci.Descriptor(oci.OCI_MANIFEST, d, 1, oci.Platform("linux", f"arch{i}")) for i in range(100)]
    shown = available_platforms(many)
    assert shown.endswith(f"and {100 - MAX_PLATFORMS_SHOWN} more") and "arch15" in shown and "arch16" not in shown
    evil = [oci.Descriptor(oci.OCI_MANIFEST, d, 1, oci.Platform("linux\nInjected: x", "a" * 1000))]
    out = available_platforms(evil)
    assert "\n" not in out and len(out) < 150
    assert available_platforms([]) == ""
    assert available_platforms(many[:1]) == "linux/arch0"
