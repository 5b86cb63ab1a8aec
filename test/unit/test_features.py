"""runtime.features: what Status advertises, from the runtime binary's report and the kernel."""

from __future__ import annotations

import asyncio
import json

from moorage.runtime import features as f

RUNC = json.dumps({"mountOptions": ["ro", "rro", "rbind"], "linux": {"namespaces": ["user", "pid"]},
                   "annotations": {"org.opencontainers.runc.version": "1.1.5"}})
RUNC_IDMAP = json.dumps({"mountOptions": ["rro"], "linux": {"namespaces": ["user"],
                                                             "mountExtensions": {"idmap": {"enabled": True}}}})
OLD = json.dumps({"mountOptions": ["ro"], "linux": {"namespaces": ["pid"]}})


def probe_of(texts: dict[str, str | None]):
    calls: list[str] = []

    def probe(path: str) -> f.BinaryFeatures:
        calls.append(path)
        text = texts[path]
        return f.BinaryFeatures(path, error="unknown command features") if text is None \
            else f.BinaryFeatures.parse(path, text)
    return probe, calls


def test_rro_from_binary_and_kernel_and_the_default_handler():
    probe, _ = probe_of({"/runc": RUNC, "/old": OLD, "/crun": None})
    r = f.compute({"runc": "/runc", "old": "/old", "crun": "/crun"}, "runc", probe=probe, kernel=(6, 1))
    assert set(r.handlers) == {"", "runc", "old", "crun"}
    assert r.handlers["runc"].recursive_read_only_mounts.advertised
    assert r.handlers[""].recursive_read_only_mounts.advertised and r.handlers[""].name == ""
    assert "does not list the rro" in r.handlers["old"].recursive_read_only_mounts.why
    assert "unknown command features" in r.handlers["crun"].recursive_read_only_mounts.why
    old_kernel = f.compute({"runc": "/runc"}, "runc", probe=probe, kernel=(5, 10))
    rro = old_kernel.handlers["runc"].recursive_read_only_mounts
    assert not rro.advertised and "5.10" in rro.why and "5.12" in rro.why


def test_user_namespaces_from_the_binary_and_the_idmap_probe():
    # moorage id-maps the rootfs itself: the runtime need only know user namespaces (runc 1.1.5
    # reports no idmap mount support and still works), the host must idmap the layers' filesystem.
    probe, _ = probe_of({"/runc": RUNC, "/old": OLD, "/crun": None})
    seen: list[str] = []

    def idmap_ok(path: str) -> str:
        seen.append(path)
        return ""

    r = f.compute({"runc": "/runc", "old": "/old", "crun": "/crun"}, "runc", probe=probe, kernel=(6, 1),
                  idmap_path="/var/lib/moorage", idmap_probe=idmap_ok)
    assert seen == ["/var/lib/moorage"]
    assert r.handlers["runc"].user_namespaces.advertised and r.handlers[""].user_namespaces.advertised
    assert "does not list the user namespace" in r.handlers["old"].user_namespaces.why
    assert "unknown command features" in r.handlers["crun"].user_namespaces.why
    assert not r.user_namespaces_host_network.advertised and "/sys" in r.user_namespaces_host_network.why
    no = f.compute({"runc": "/runc"}, "runc", probe=probe, kernel=(6, 1),
                   idmap_probe=lambda p: f"no idmapped mount of {p}: Invalid argument")
    u = no.handlers["runc"].user_namespaces
    assert u.state == f.State.UNAVAILABLE and "no idmapped mount of /" in u.why
    d = f.compute({"runc": "/runc"}, "runc", ["user_namespaces"], probe=probe, kernel=(6, 1), idmap_probe=idmap_ok)
    assert d.handlers[""].user_namespaces.state == f.State.DISABLED


def test_crun_without_a_features_command_still_knows_user_namespaces():
    # Debian 12's crun 1.8.1 has no `features`; its --version names it, and crun knows every namespace.
    b = f.run_features("/usr/bin/crun")
    assert "unknown command features" in b.error and "user" in b.namespaces and b.version
    r = f.compute({"crun": "/usr/bin/crun"}, "crun", idmap_probe=lambda p: "")
    assert r.handlers["crun"].user_namespaces.advertised
    assert not r.handlers["crun"].recursive_read_only_mounts.advertised  # its mount options stay unknown


def test_the_idmap_probe_on_this_host():
    # Kernel 6.x and ext4/tmpfs: an idmapped mount can be made (the real probe, no fake).
    assert f.idmap_why_not("/tmp/does/not/exist") == ""


def test_runtime_features_and_disabled():
    probe, _ = probe_of({"/runc": RUNC})
    r = f.compute({"runc": "/runc"}, "runc", probe=probe, kernel=(6, 1))
    assert r.supplemental_groups_policy.advertised and r.mount_options.advertised
    d = f.compute({"runc": "/runc"}, "runc", ["mount_options", "recursive_read_only_mounts"], probe=probe,
                  kernel=(6, 1))
    assert d.mount_options.state == f.State.DISABLED and not d.mount_options.advertised
    assert d.handlers[""].recursive_read_only_mounts.state == f.State.DISABLED
    assert d.supplemental_groups_policy.advertised


def test_probe_runs_each_binary_once_and_caches():
    probe, calls = probe_of({"/runc": RUNC})
    fp = f.FeatureProbe({"runc": "/runc", "runc2": "/runc"}, "runc", probe=probe, idmap_path="/tmp")

    async def many() -> None:
        await asyncio.gather(*(fp.areport() for _ in range(5)))
        await fp.areport()

    asyncio.run(many())
    fp.report()
    assert calls == ["/runc"]


def test_bad_output_is_an_error_not_a_crash():
    assert f.BinaryFeatures.parse("/x", "not json").error
    assert f.BinaryFeatures.parse("/x", "[]").error
    assert f.run_features("/nonexistent/runtime").error

