"""The ``moorage`` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable

from moorage.core.errors import MoorageError
from moorage.cri import cli_admin, cli_fsck, cli_images, config_reference, logs, server, tracing
from moorage.cri import config as configmod
from moorage.cri.version import CRI_API_VERSION, VERSION


def _serve_loader(args: argparse.Namespace) -> Callable[[], configmod.LoadedConfig]:
    """Loads the config files with the command line's overrides on top (again on each SIGHUP,
    so an override keeps winning over the files)."""
    overrides = {"log_level": args.log_level, "socket": args.socket, "root_dir": args.root, "state_dir": args.state}

    def load() -> configmod.LoadedConfig:
        loaded = configmod.load_layers(args.config)
        for key, value in overrides.items():
            if value:
                setattr(loaded.config, key, value)
                loaded.origins[key] = "command line"
        configmod.validate(loaded.config, "command line")
        return loaded

    return load


def _cmd_serve(args: argparse.Namespace) -> int:
    load = _serve_loader(args)
    loaded = load()
    cfg = loaded.config
    logs.setup(cfg.log_level, cfg.log_format)
    logging.getLogger("moorage.config").info("config loaded", extra={"fields": {"files": loaded.files}})
    tracing.setup(cfg.tracing.enabled, cfg.tracing.endpoint, cfg.tracing.sampling_ratio, cfg.tracing.service_name)
    try:
        asyncio.run(server.run(cfg, load))
    finally:
        tracing.shutdown()
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    if args.config_cmd == "default":
        sys.stdout.write(configmod.dumps(configmod.Config()))
    elif args.config_cmd == "dump":
        loaded = configmod.load_layers(args.config)
        files = ", ".join(loaded.files) or "none (every key has its default)"
        sys.stdout.write(f"# The effective config; files merged in this order: {files}\n"
                         f"# Each key ends with the file it came from, or \"{configmod.DEFAULT_ORIGIN}\".\n\n")
        sys.stdout.write(configmod.dumps(loaded.config, comments=False, origin=loaded.origin))
    elif args.config_cmd == "reference":
        sys.stdout.write(config_reference.markdown())
    else:
        loaded = configmod.load_layers(args.path)
        for f in loaded.files:
            print(f"{f}: ok")
    return 0


def _check_items(cfg: configmod.Config) -> list[tuple[str, bool, str]]:
    items: list[tuple[str, bool, str]] = []

    def binary(label: str, path: str, pkg: str) -> None:
        found = path if os.path.isabs(path) and os.access(path, os.X_OK) else shutil.which(path)
        items.append((label, bool(found), found or f"not found; install the Debian package {pkg}"))

    for name, h in sorted(cfg.runtime.handlers.items()):
        binary(f"runtime handler {name}", h.path, name)
    binary("conmon", cfg.runtime.conmon, "conmon")
    binary("catatonit (pod infra process)", cfg.runtime.infra_binary, "catatonit")
    plugins = [d for d in cfg.cni.bin_dirs if os.path.isfile(os.path.join(d, "bridge"))]
    items.append(("CNI plugins", bool(plugins), ", ".join(plugins) if plugins else
                  f"no bridge plugin in {':'.join(cfg.cni.bin_dirs)}; install containernetworking-plugins"))
    try:
        with open("/proc/filesystems") as f:
            overlay = any(line.split()[-1] == "overlay" for line in f if line.strip())
    except OSError:
        overlay = False
    items.append(("overlayfs", overlay or cfg.images.snapshotter == "native",
                  "available" if overlay else "missing; `modprobe overlay` or set images.snapshotter = \"native\""))
    if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        items.append(("cgroups", True, "v2 (unified)"))
    elif os.path.isdir("/sys/fs/cgroup/memory"):
        items.append(("cgroups", True, "v1"))
    else:
        items.append(("cgroups", False, "no cgroup v1 or v2 hierarchy under /sys/fs/cgroup; mount cgroups"))
    missing = [ns for ns in ("net", "ipc", "uts", "pid", "mnt") if not os.path.exists(f"/proc/self/ns/{ns}")]
    items.append(("kernel namespaces", not missing, "net ipc uts pid mnt" if not missing else
                  f"missing: {' '.join(missing)}; the kernel lacks namespace support"))
    binary("iptables (portmap plugin)", "iptables", "iptables")
    items.append(_hugetlb_item(cfg))
    items.append(cli_admin.cgroup_driver_item(cfg.runtime.cgroup_driver))
    items.append(_cdi_item(cfg))
    items.append(_nri_item(cfg))
    return items


def _nri_item(cfg: configmod.Config) -> tuple[str, bool, str]:
    """NRI: on or off, where plugins connect, and the pre-installed plugins the daemon launches."""
    from moorage.nri.adaptation import discover_plugins

    n = cfg.nri
    if not n.enable:
        return "NRI", True, "disabled (nri.enable = false): no plugins are called"
    if n.disable_connections:
        where = "external connections disabled (nri.disable_connections = true)"
    else:
        up = os.path.exists(n.socket_path)
        where = f"socket {n.socket_path} ({'present: a daemon serves it' if up else 'absent until the daemon starts'})"
    good, bad = discover_plugins(n.plugin_path)
    plugins = f"pre-installed plugins in {n.plugin_path}: {', '.join(good) if good else 'none'}"
    hint = f"enabled; {where}; {plugins}"
    if bad:
        return "NRI", True, f"{cli_admin.WARNING}{hint}; ignored (not named NN-name): {', '.join(bad)}"
    return "NRI", True, hint


def _cdi_item(cfg: configmod.Config) -> tuple[str, bool, str]:
    """CDI: on or off, the spec directories, and the devices they define (as CreateContainer sees them)."""
    from moorage.runtime import cdi

    rt = cfg.runtime
    if not rt.enable_cdi:
        return "CDI", True, "disabled (runtime.enable_cdi = false): CDI device requests are ignored"
    reg = cdi.load_dirs(rt.cdi_spec_dirs)
    dirs = ", ".join(d if os.path.isdir(d) else f"{d} (missing)" for d in rt.cdi_spec_dirs)
    hint = (f"enabled; spec dirs {dirs}: {len(reg.devices)} device{'' if len(reg.devices) == 1 else 's'} "
            f"from {len(reg.specs)} spec file{'' if len(reg.specs) == 1 else 's'}")
    problems = [f"{p}: {m}" for p, m in sorted(reg.errors.items())]
    problems += [f"{q} is defined by {', '.join(files)}" for q, files in sorted(reg.conflicts.items())]
    if problems:
        return "CDI", True, f"{cli_admin.WARNING}{hint}; not usable: {'; '.join(problems)}"
    return "CDI", True, hint


def _hugetlb_item(cfg: configmod.Config) -> tuple[str, bool, str]:
    """The kubelet sends hugepage limits for every container: can this host take them?"""
    from moorage.runtime import cgroups, spec

    label = "hugetlb cgroup controller"
    rt = cfg.runtime
    if rt.disable_hugetlb_controller:
        return label, True, "not used (runtime.disable_hugetlb_controller = true): hugepage limits are never set"
    try:
        path = spec.cgroups_path(rt.cgroup_driver, rt.default_cgroup_parent, "check")
    except MoorageError:  # e.g. the systemd driver with a cgroupfs default parent: ask about the root
        path = "/check"
    why = cgroups.hugetlb_missing(path)
    if why is None:
        return label, True, "available: hugepage limits are set"
    if rt.tolerate_missing_hugetlb_controller:
        return label, True, (f"not usable ({why}); hugepage limits are dropped "
                             "(runtime.tolerate_missing_hugetlb_controller = true)")
    return label, False, (f"not usable ({why}); every container the kubelet sends (always with hugepage limits) "
                          "is refused: mount the hugetlb controller or set "
                          "runtime.tolerate_missing_hugetlb_controller = true")


def _feature_lines(cfg: configmod.Config) -> list[tuple[str, str]]:
    """(label, state and why) of every CRI feature Status advertises, as the daemon computes them."""
    from moorage.runtime import features

    rt = cfg.runtime
    report = features.compute({n: h.path for n, h in rt.handlers.items()}, rt.default_handler,
                              rt.disabled_features, idmap_path=cfg.root_dir)
    out: list[tuple[str, str]] = []
    for name, h in sorted(report.handlers.items()):
        where = f"handler {name}" if name else f"handler \"\" (default: {rt.default_handler})"
        out.extend((f"{f.name} [{where}]", f.describe()) for f in h.features())
    out.extend((f.name, f.describe()) for f in report.runtime_features())
    out.append(("checkpoint/restore (CheckpointContainer, CheckpointPod, RestorePod)", _criu_state()))
    return out


def _criu_state() -> str:
    """Checkpointing is not implemented; say whether this host could even do it (``criu check``)."""
    criu = shutil.which("criu")
    if criu is None:
        return "unavailable: not implemented (UNIMPLEMENTED); criu is not installed"
    try:
        p = subprocess.run([criu, "check"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable: not implemented (UNIMPLEMENTED); `criu check` could not run: {e}"
    lines = [ln.strip() for ln in (p.stderr + p.stdout).splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("Error")]
    if p.returncode != 0 or errors:
        why = (errors or lines or [f"exit status {p.returncode}"])[0][:200]
        return f"unavailable: not implemented (UNIMPLEMENTED); `criu check` fails here: {why}"
    return "unavailable: not implemented (UNIMPLEMENTED), although `criu check` passes on this host"


def _cmd_check(args: argparse.Namespace) -> int:
    cfg = configmod.load(args.config)
    items = _check_items(cfg)
    width = max(len(label) for label, _, _ in items)
    for label, ok, hint in items:
        status = "missing" if not ok else "warn   " if hint.startswith(cli_admin.WARNING) else "ok     "
        print(f"{status}  {label.ljust(width)}  {hint.removeprefix(cli_admin.WARNING)}")
    # Informational: a feature this host lacks is not advertised, and the daemon still works.
    feats = _feature_lines(cfg)
    print("\nCRI features (advertised in Status only when available):")
    fwidth = max(len(label) for label, _ in feats)
    for label, state in feats:
        print(f"  {label.ljust(fwidth)}  {state}")
    return 0 if all(ok for _, ok, _ in items) else 1


def _cmd_version(args: argparse.Namespace) -> int:
    print(f"moorage {VERSION} (CRI {CRI_API_VERSION})")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moorage", description="A Kubernetes CRI runtime on runc/crun and conmon.")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="run the daemon in the foreground")
    s.add_argument("--config", help=f"TOML config file (default {configmod.DEFAULT_CONFIG_PATH} if present)")
    s.add_argument("--log-level", choices=configmod.LOG_LEVELS)
    s.add_argument("--socket", help="override the gRPC socket path")
    s.add_argument("--root", help="override root_dir")
    s.add_argument("--state", help="override state_dir")
    s.set_defaults(func=_cmd_serve)

    c = sub.add_parser("config", help="print or check configuration")
    csub = c.add_subparsers(dest="config_cmd", required=True)
    csub.add_parser("default", help="print the full default config")
    chk = csub.add_parser("check", help="validate a config file and the drop-ins of its config.d directory")
    chk.add_argument("path")
    dump = csub.add_parser("dump", help="print the effective config, each key with the file it came from")
    dump.add_argument("--config", help=f"main config file (default {configmod.DEFAULT_CONFIG_PATH}, may be absent)")
    csub.add_parser("reference", help="print the config reference (Markdown, as docs/config.md)")
    c.set_defaults(func=_cmd_config)

    k = sub.add_parser("check", help="preflight: are this host's dependencies present?")
    k.add_argument("--config")
    k.set_defaults(func=_cmd_check)

    v = sub.add_parser("version", help="print the version")
    v.set_defaults(func=_cmd_version)

    cli_images.register(sub)
    cli_admin.register(sub)
    cli_fsck.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except MoorageError as e:
        print(f"moorage: {e.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
