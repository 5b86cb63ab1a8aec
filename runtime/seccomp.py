"""Seccomp profiles for ``linux.seccomp`` in an OCI runtime spec.

* ``default_profile(caps)`` builds moorage's ``RuntimeDefault`` profile: deny by
  default with EPERM, allow a large list of ordinary syscalls, plus rules that
  depend on the container's capabilities (e.g. ``mount`` only with
  ``CAP_SYS_ADMIN``) and on the architecture.  It is modelled on the
  containerd/Docker default profile; the syscall list is data, kept in
  ``seccomp_default.json`` next to this module.
* ``load_localhost(path)`` reads a ``Localhost`` profile from the node.  Both
  the OCI form (``defaultAction``/``syscalls``/``architectures``) and the Docker
  form (with ``archMap`` and ``includes``/``excludes`` conditions) are accepted;
  the result is always a plain OCI ``linux.seccomp`` object.
"""

from __future__ import annotations

import copy
import functools
import importlib.resources
import json
import os
import platform
from collections.abc import Callable, Iterable

from moorage.core.errors import InvalidArgument, NotFound

# Read as a package resource, so that it loads from a zipapp (dist/moorage.pyz) as from files.
_DATA = importlib.resources.files(__package__ or "moorage.runtime").joinpath("seccomp_default.json")

#: Bound on the size of a Localhost profile file.
MAX_PROFILE_BYTES = 4 << 20

ACTIONS = frozenset(
    {
        "SCMP_ACT_KILL",
        "SCMP_ACT_KILL_PROCESS",
        "SCMP_ACT_KILL_THREAD",
        "SCMP_ACT_TRAP",
        "SCMP_ACT_ERRNO",
        "SCMP_ACT_TRACE",
        "SCMP_ACT_ALLOW",
        "SCMP_ACT_LOG",
        "SCMP_ACT_NOTIFY",
    }
)
OPERATORS = frozenset(
    {
        "SCMP_CMP_NE",
        "SCMP_CMP_LT",
        "SCMP_CMP_LE",
        "SCMP_CMP_EQ",
        "SCMP_CMP_GE",
        "SCMP_CMP_GT",
        "SCMP_CMP_MASKED_EQ",
    }
)

# uname -m spellings (and Go's) → the key used in the data file.
_MACHINE_ALIASES = {
    "x86_64": "x86_64",
    "amd64": "x86_64",
    "aarch64": "aarch64",
    "arm64": "aarch64",
}

# Docker "archMap"/"includes.arches" use Go names.
_GO_ARCH_TO_SCMP = {
    "amd64": "SCMP_ARCH_X86_64",
    "x86": "SCMP_ARCH_X86",
    "386": "SCMP_ARCH_X86",
    "x32": "SCMP_ARCH_X32",
    "arm64": "SCMP_ARCH_AARCH64",
    "arm": "SCMP_ARCH_ARM",
    "ppc64le": "SCMP_ARCH_PPC64LE",
    "s390x": "SCMP_ARCH_S390X",
    "s390": "SCMP_ARCH_S390",
    "riscv64": "SCMP_ARCH_RISCV64",
}


@functools.lru_cache(maxsize=1)
def _data() -> dict:
    return json.loads(_DATA.read_text(encoding="utf-8"))


def host_arch() -> str:
    return _MACHINE_ALIASES.get(platform.machine().lower(), platform.machine().lower())


def _norm_cap(c: str) -> str:
    c = c.strip().upper()
    return c if c.startswith("CAP_") else "CAP_" + c


def default_profile(capabilities: Iterable[str], arch: str | None = None) -> dict:
    """The RuntimeDefault ``linux.seccomp`` object for a process with ``capabilities``.

    ``capabilities`` is the container's bounding set (``CAP_`` prefix optional).
    ``arch`` is a machine name (``x86_64``/``aarch64``; default: this host).  On
    other architectures the profile carries no ``architectures`` list, so the
    runtime applies it to the native one, without arch-specific extras.
    """
    caps = {_norm_cap(c) for c in capabilities}
    machine = _MACHINE_ALIASES.get((arch or host_arch()).lower(), (arch or "").lower())
    data = _data()
    syscalls: list[dict] = []
    for rule in data["rules"]:
        when = rule.get("when") or {}
        if "arch" in when and machine not in when["arch"]:
            continue
        if "caps" in when and not caps.intersection(when["caps"]):
            continue
        if "not_caps" in when and caps.intersection(when["not_caps"]):
            continue
        entry: dict = {"names": list(rule["names"]), "action": rule["action"]}
        if "errnoRet" in rule:
            entry["errnoRet"] = rule["errnoRet"]
        if rule.get("args"):
            entry["args"] = copy.deepcopy(rule["args"])
        syscalls.append(entry)
    profile: dict = {
        "defaultAction": data["defaultAction"],
        "defaultErrnoRet": data["defaultErrnoRet"],
    }
    arches = data["architectures"].get(machine)
    if arches:
        profile["architectures"] = list(arches)
    profile["syscalls"] = syscalls
    return profile


# --- Localhost profiles -----------------------------------------------------------


def load_localhost(path: str, capabilities: Iterable[str] = (), arch: str | None = None) -> dict:
    """Read and validate a node-local seccomp profile; return an OCI ``linux.seccomp``.

    ``path`` is the CRI ``localhost_ref`` (a ``localhost/`` prefix, as older
    kubelets send it, is stripped).  ``capabilities``/``arch`` are only used to
    evaluate Docker-style ``includes``/``excludes`` conditions.
    """
    ref = path[len("localhost/"):] if path.startswith("localhost/") else path
    if not ref:
        raise InvalidArgument("seccomp profile type Localhost needs a localhost_ref (a file path)")
    if not os.path.isabs(ref):
        raise InvalidArgument(
            f"seccomp profile path {ref!r} must be absolute "
            "(the kubelet resolves it under its seccomp profile root)"
        )
    try:
        st = os.stat(ref)
    except FileNotFoundError:
        raise NotFound(f"seccomp profile {ref} does not exist on this node") from None
    except OSError as e:
        raise InvalidArgument(f"cannot read seccomp profile {ref}: {e.strerror}") from None
    if not os.path.isfile(ref):
        raise InvalidArgument(f"seccomp profile {ref} is not a regular file")
    if st.st_size > MAX_PROFILE_BYTES:
        raise InvalidArgument(f"seccomp profile {ref} is larger than {MAX_PROFILE_BYTES} bytes")
    try:
        with open(ref, "rb") as f:
            raw = f.read(MAX_PROFILE_BYTES + 1)
    except OSError as e:
        raise InvalidArgument(f"cannot read seccomp profile {ref}: {e.strerror}") from None
    if len(raw) > MAX_PROFILE_BYTES:
        raise InvalidArgument(f"seccomp profile {ref} is larger than {MAX_PROFILE_BYTES} bytes")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"seccomp profile {ref} is not valid JSON: {e}") from None
    return parse_profile(doc, source=ref, capabilities=capabilities, arch=arch)


def parse_profile(
    doc: object, *, source: str = "profile", capabilities: Iterable[str] = (), arch: str | None = None
) -> dict:
    """Validate a profile document and convert it to an OCI ``linux.seccomp`` object."""

    def bad(msg: str) -> InvalidArgument:
        return InvalidArgument(f"seccomp profile {source}: {msg}")

    if not isinstance(doc, dict):
        raise bad("top level must be a JSON object")
    action = doc.get("defaultAction")
    if action not in ACTIONS:
        raise bad(f"defaultAction {action!r} is not one of {', '.join(sorted(ACTIONS))}")
    caps = {_norm_cap(c) for c in capabilities}
    machine = _MACHINE_ALIASES.get((arch or host_arch()).lower(), (arch or "").lower())
    go_arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)

    out: dict = {"defaultAction": action}
    if "defaultErrnoRet" in doc and doc["defaultErrnoRet"] is not None:
        out["defaultErrnoRet"] = _uint(doc["defaultErrnoRet"], "defaultErrnoRet", bad)

    arches = doc.get("architectures")
    if arches is not None:
        if not isinstance(arches, list) or not all(
            isinstance(a, str) and a.startswith("SCMP_ARCH_") for a in arches
        ):
            raise bad("architectures must be a list of SCMP_ARCH_* names")
        if arches:
            out["architectures"] = list(arches)
    arch_map = doc.get("archMap")
    if arch_map is not None and "architectures" not in out:
        if not isinstance(arch_map, list):
            raise bad("archMap must be a list")
        native = _GO_ARCH_TO_SCMP.get(go_arch)
        for m in arch_map:
            if not isinstance(m, dict) or not isinstance(m.get("architecture"), str):
                raise bad("archMap entries need an 'architecture'")
            if m["architecture"] == native:
                subs = m.get("subArchitectures") or []
                if not isinstance(subs, list) or not all(isinstance(s, str) for s in subs):
                    raise bad("subArchitectures must be a list of names")
                out["architectures"] = [native, *subs]

    for key in ("flags", "listenerPath", "listenerMetadata"):
        if key in doc and doc[key] not in (None, "", []):
            out[key] = doc[key]
    if "flags" in out and not (
        isinstance(out["flags"], list) and all(isinstance(f, str) for f in out["flags"])
    ):
        raise bad("flags must be a list of strings")

    syscalls_in = doc.get("syscalls")
    if syscalls_in is None:
        syscalls_in = []
    if not isinstance(syscalls_in, list):
        raise bad("syscalls must be a list")
    syscalls: list[dict] = []
    for i, s in enumerate(syscalls_in):
        where = f"syscalls[{i}]"
        if not isinstance(s, dict):
            raise bad(f"{where} must be an object")
        if not _conditions_hold(s, caps, go_arch, bad, where):
            continue
        names = s.get("names")
        if names is None and isinstance(s.get("name"), str):  # very old Docker format
            names = [s["name"]]
        if not isinstance(names, list) or not names or not all(
            isinstance(n, str) and n for n in names
        ):
            raise bad(f"{where}.names must be a non-empty list of syscall names")
        act = s.get("action")
        if act not in ACTIONS:
            raise bad(f"{where}.action {act!r} is not a valid seccomp action")
        entry: dict = {"names": list(names), "action": act}
        if s.get("errnoRet") is not None:
            entry["errnoRet"] = _uint(s["errnoRet"], f"{where}.errnoRet", bad)
        args = s.get("args") or []
        if not isinstance(args, list):
            raise bad(f"{where}.args must be a list")
        if args:
            entry["args"] = [_arg(a, f"{where}.args[{j}]", bad) for j, a in enumerate(args)]
        syscalls.append(entry)
    out["syscalls"] = syscalls
    return out


def _uint(v: object, what: str, bad: Callable[[str], InvalidArgument]) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0 or v > 0xFFFFFFFF:
        raise bad(f"{what} must be an unsigned 32-bit integer")
    return v


def _arg(a: object, where: str, bad: Callable[[str], InvalidArgument]) -> dict:
    if not isinstance(a, dict):
        raise bad(f"{where} must be an object")
    op = a.get("op")
    if op not in OPERATORS:
        raise bad(f"{where}.op {op!r} is not one of {', '.join(sorted(OPERATORS))}")
    out = {}
    for k in ("index", "value", "valueTwo"):
        v = a.get(k, 0)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0 or v > 0xFFFFFFFFFFFFFFFF:
            raise bad(f"{where}.{k} must be an unsigned integer")
        out[k] = v
    if out["index"] > 5:
        raise bad(f"{where}.index must be 0..5 (syscalls take at most six arguments)")
    out["op"] = op
    return out


def _conditions_hold(s: dict, caps: set[str], go_arch: str, bad: Callable[[str], InvalidArgument],
                     where: str) -> bool:
    """Evaluate Docker-style ``includes``/``excludes`` (kernel versions are ignored)."""
    inc = s.get("includes") or {}
    exc = s.get("excludes") or {}
    if not isinstance(inc, dict) or not isinstance(exc, dict):
        raise bad(f"{where}.includes/excludes must be objects")
    if inc.get("caps") and not all(_norm_cap(c) in caps for c in inc["caps"]):
        return False
    if inc.get("arches") and go_arch not in inc["arches"]:
        return False
    if exc.get("caps") and any(_norm_cap(c) in caps for c in exc["caps"]):
        return False
    if exc.get("arches") and go_arch in exc["arches"]:
        return False
    return True
