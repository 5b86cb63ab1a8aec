"""Every knob of the runtime and image settings is reachable from config.toml, documented, and printed
by ``moorage config default``.  Walks the settings dataclasses, so a new field without a key fails here."""

from __future__ import annotations

import dataclasses
import os
import re

import pytest

from moorage.cri import config as c
from moorage.cri.services import image_settings, nri_settings, runtime_settings
from moorage.images.service import ImageSettings
from moorage.nri.adaptation import NRISettings
from moorage.runtime.service import RuntimeSettings
from moorage.runtime.spec import RuntimeSpecConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# One config.toml snippet per knob, each setting a value other than the default.
SNIPPETS = [
    'root_dir = "/var/lib/elsewhere"',
    'state_dir = "/run/elsewhere"',
    'log_level = "debug"',
    '[cni]\nnetns_dir = "/run/other-netns"',
    '[runtime.handlers.runc]\npath = "/opt/bin/runc"',
    '[runtime.handlers.runc]\npath = "/usr/sbin/runc"\nroot = "/run/runc-root"',
    '[runtime]\ndefault_handler = "crun"',
    '[runtime]\nconmon = "/opt/bin/conmon"',
    '[runtime]\ninfra_binary = "/opt/bin/catatonit"',
    '[runtime]\ndrop_infra = false',
    '[runtime]\ncgroup_driver = "systemd"',
    '[runtime]\ndefault_cgroup_parent = "/elsewhere"',
    '[runtime]\nexec_sync_max_output = 1024',
    '[limits]\ngrpc_max_recv_message_size = 8388608',
    '[limits]\nmax_labels_annotations_bytes = 4096',
    '[runtime]\ndefault_capabilities = ["CHOWN"]',
    '[runtime.default_sysctls]\n"net.ipv4.ping_group_range" = "0 2147483647"',
    '[runtime]\nseccomp_default = true',
    '[runtime]\nseccomp_arch = "aarch64"',
    '[runtime]\napparmor_default_profile = "moorage-default"',
    '[runtime]\nselinux_enabled = true',
    '[runtime]\ncgroup_namespace = "private"',
    '[runtime]\ncgroup_namespace = "host"',
    '[runtime]\nmasked_paths = ["/proc/kcore"]',
    '[runtime]\nreadonly_paths = ["/proc/sys"]',
    '[runtime]\ntmpfs_size = "64m"',
    '[runtime]\nsandbox_cpu_shares = 0',
    '[runtime]\nprivileged_without_host_devices = true',
    '[runtime.rlimits]\nNOFILE = [1024, 4096]',
    '[runtime]\nallowed_annotations = ["io.kubernetes.cri.rdt-class"]',
    '[runtime]\npod_annotations = ["example.com/*"]',
    '[runtime]\ndisable_hugetlb_controller = true',
    '[runtime]\ntolerate_missing_hugetlb_controller = false',
    '[runtime]\ndisabled_features = ["mount_options"]',
    '[runtime]\nuserns_length_multiple = 1',
    '[runtime]\nsandbox_image = "registry.k8s.io/pause:3.9"',
    '[runtime]\nenable_cdi = false',
    '[runtime]\ncdi_spec_dirs = ["/opt/cdi"]',
    '[nri]\nenable = false',
    '[nri]\nsocket_path = "/run/other/nri.sock"',
    '[nri]\nplugin_path = "/srv/nri/plugins"',
    '[nri]\nplugin_config_path = "/srv/nri/conf.d"',
    '[nri]\nplugin_registration_timeout = 9.0',
    '[nri]\nplugin_request_timeout = 3.0',
    '[nri]\ndisable_connections = true',
    '[nri]\nfail_on_plugin_loss = true',
    '[images]\nsnapshotter = "native"',
    '[images]\nregistry_config_path = "/etc/other/certs.d"',
    '[images]\ninsecure_registries = ["localhost:5000"]',
    '[images]\npull_retries = 5',
    '[images]\nstall_timeout = 5.0',
    '[images]\nmax_concurrent_downloads = 1',
    '[images]\ngc_on_remove = false',
    '[images]\nauth_file = "/etc/moorage/auth.json"',
    '[images]\ncredential_helper_timeout = 3.0',
    '[images]\npinned_images = ["registry.k8s.io/pause:3.10"]',
    '[images]\ncontainer_root = "/var/lib/moorage-containers"',
    '[images]\nsync_snapshots = false',
    '[images]\nfs_usage_period = 2.5',
]


def _flat(obj: object, prefix: str = "") -> dict[str, object]:
    """A settings dataclass as {field path: value}, nested dataclasses walked."""
    out: dict[str, object] = {}
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            out.update(_flat(v, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = v
    return out


def _fields(cls: type, prefix: str = "") -> set[str]:
    names: set[str] = set()
    hints = {f.name: f for f in dataclasses.fields(cls)}
    for name, f in hints.items():
        tp = f.type if isinstance(f.type, type) else None
        if f.name == "spec":
            names |= _fields(RuntimeSpecConfig, f"{prefix}spec.")
        elif tp is not None and dataclasses.is_dataclass(tp):
            names |= _fields(tp, f"{prefix}{name}.")
        else:
            names.add(prefix + name)
    return names


@pytest.mark.parametrize("cls, build", [(RuntimeSettings, runtime_settings), (ImageSettings, image_settings),
                                        (NRISettings, nri_settings)])
def test_every_settings_field_has_a_config_key(cls, build):
    base = _flat(build(c.loads("")))
    changed: set[str] = set()
    for snippet in SNIPPETS:
        now = _flat(build(c.loads(snippet, "test.toml")))
        changed |= {k for k in now if now[k] != base[k]}
    missing = _fields(cls) - changed
    assert not missing, f"settings without a config.toml key (add one, and a snippet here): {sorted(missing)}"
    assert set(base) == _fields(cls)


def test_every_key_is_commented_in_config_default():
    lines = c.dumps(c.Config()).splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^[a-z_]+ = ", line):
            assert lines[i - 1].startswith("# "), f"no comment above {line!r}"
    keys = {line.split(" = ")[0] for line in lines if re.match(r"^[a-z_]+ = ", line)}
    for new in ("apparmor_default_profile", "selinux_enabled", "seccomp_arch", "cgroup_namespace", "masked_paths",
                "readonly_paths", "tmpfs_size", "sandbox_cpu_shares", "privileged_without_host_devices",
                "allowed_annotations", "pod_annotations", "disable_hugetlb_controller",
                "tolerate_missing_hugetlb_controller"):
        assert new in keys
    assert "[runtime.rlimits]" in lines and "[runtime.default_sysctls]" in lines
    assert "stop_timeout_grace" not in keys


def test_shipped_example_is_the_commented_default():
    with open(os.path.join(REPO, "manifests", "config.toml")) as f:
        text = f.read()
    body = "\n".join(line for line in text.splitlines() if not line.startswith("## ")).lstrip("\n") + "\n"
    assert body == c.dumps(c.Config()), "manifests/config.toml is out of date: regenerate it with `moorage config default`"


def test_values_reach_the_spec_config():
    s = runtime_settings(c.loads('[runtime]\ncgroup_namespace = "private"\n[runtime.rlimits]\nnofile = [10, 20]\n'
                                 'RLIMIT_CORE = [0, 0]\n[runtime.default_sysctls]\n"net/ipv4/ip_unprivileged_port_start" = "0"'))
    assert s.spec.cgroupns is True
    assert s.spec.rlimits == (("RLIMIT_CORE", 0, 0), ("RLIMIT_NOFILE", 10, 20))
    assert dict(s.spec.default_sysctls) == {"net/ipv4/ip_unprivileged_port_start": "0"}
    assert runtime_settings(c.loads('[runtime]\ncgroup_namespace = "host"')).spec.cgroupns is False
    assert runtime_settings(c.loads("")).spec.seccomp_arch is None  # empty: this host's


@pytest.mark.parametrize("text, key", [
    ('[runtime.default_sysctls]\n"kernel.hostname" = "x"', "runtime.default_sysctls.kernel.hostname"),
    ('[runtime.default_sysctls]\n"vm.swappiness" = "1"', "runtime.default_sysctls.vm.swappiness"),
    ('[runtime]\nseccomp_arch = "x86 64"', "runtime.seccomp_arch"),
    ('[runtime]\napparmor_default_profile = "a b"', "runtime.apparmor_default_profile"),
    ('[runtime]\nselinux_enabled = "yes"', "runtime.selinux_enabled"),
    ('[runtime]\ncgroup_namespace = "shared"', "runtime.cgroup_namespace"),
    ('[runtime]\nmasked_paths = ["proc/kcore"]', "runtime.masked_paths[0]"),
    ('[runtime]\nreadonly_paths = ["/proc/../etc"]', "runtime.readonly_paths[0]"),
    ('[runtime]\ntmpfs_size = "lots"', "runtime.tmpfs_size"),
    ('[runtime]\nuserns_length_multiple = 0', "runtime.userns_length_multiple"),
    ('[runtime]\nsandbox_cpu_shares = 1', "runtime.sandbox_cpu_shares"),
    ('[runtime]\nprivileged_without_host_devices = 1', "runtime.privileged_without_host_devices"),
    ('[runtime.rlimits]\nNOFILES = [1, 1]', "runtime.rlimits.NOFILES"),
    ('[runtime.rlimits]\nNOFILE = [2, 1]', "runtime.rlimits.NOFILE"),
    ('[runtime.rlimits]\nNOFILE = [1]', "runtime.rlimits.NOFILE"),
    ('[runtime.rlimits]\nNOFILE = ["1", "2"]', "runtime.rlimits.NOFILE[0]"),
    ('[runtime]\nallowed_annotations = [""]', "runtime.allowed_annotations[0]"),
    ('[runtime]\npod_annotations = [" "]', "runtime.pod_annotations[0]"),
    ('[runtime]\ndisable_hugetlb_controller = "no"', "runtime.disable_hugetlb_controller"),
    ('[runtime]\ntolerate_missing_hugetlb_controller = 0', "runtime.tolerate_missing_hugetlb_controller"),
    ('[runtime]\ndefault_capabilities = ["FLY"]', "runtime.default_capabilities[0]"),
    ('[runtime]\nexec_sync_max_output = 0', "runtime.exec_sync_max_output"),
    ('[limits]\ngrpc_max_recv_message_size = 1000', "limits.grpc_max_recv_message_size"),
    ('[limits]\nmax_labels_annotations_bytes = 100', "limits.max_labels_annotations_bytes"),
    ('[limits]\nmax_labels_annotations_bytes = 16777216', "limits.max_labels_annotations_bytes"),
    ('[runtime]\ndefault_cgroup_parent = "/a/../b"', "runtime.default_cgroup_parent"),
    ('[runtime]\ndefault_cgroup_parent = "a.slice:x:y"', "runtime.default_cgroup_parent"),
    ('[runtime]\nstop_timeout_grace = 2.0', "runtime.stop_timeout_grace"),
    ('[runtime]\nenable_cdi = "yes"', "runtime.enable_cdi"),
    ('[runtime]\ncdi_spec_dirs = ["etc/cdi"]', "runtime.cdi_spec_dirs[0]"),
    ('[runtime]\ncdi_spec_dirs = ["/etc/cdi", "/etc/cdi/"]', "runtime.cdi_spec_dirs"),
])
def test_bad_knob_is_reported_by_file_and_key(text, key):
    with pytest.raises(c.ConfigError) as e:
        c.loads(text, "/etc/moorage/config.toml")
    assert e.value.message.startswith("/etc/moorage/config.toml: ")
    assert f"key {key!r}" in e.value.message, e.value.message
