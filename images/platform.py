"""Platform detection, normalisation and matching (containerd-compatible rules).

``host_platform()`` reports this machine as GOOS/GOARCH[/variant].  ``Matcher``
ranks the platforms of an index's entries against a wanted platform: an exact
match is best, then compatible older variants (arm/v7 runs v6 and v5, amd64
runs 386, arm64 falls back to 32-bit arm last), and the first entry wins ties,
as the index order is the publisher's preference.
"""

from __future__ import annotations

import os
import platform as _pyplatform
from collections.abc import Iterable, Sequence

from moorage.core.errors import InvalidArgument, NotFound
from moorage.core.safejson import clip
from moorage.images.oci import Descriptor, Platform

_ARCH_ALIASES: dict[str, tuple[str, str]] = {
    # uname / distro name -> (GOARCH, variant)
    "x86_64": ("amd64", ""),
    "x86-64": ("amd64", ""),
    "amd64": ("amd64", ""),
    "i386": ("386", ""),
    "i486": ("386", ""),
    "i586": ("386", ""),
    "i686": ("386", ""),
    "386": ("386", ""),
    "aarch64": ("arm64", ""),
    "arm64": ("arm64", ""),
    "armv8l": ("arm", "v8"),
    "armv7l": ("arm", "v7"),
    "armv7": ("arm", "v7"),
    "armhf": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "armv6": ("arm", "v6"),
    "armel": ("arm", "v6"),
    "armv5tel": ("arm", "v5"),
    "armv5l": ("arm", "v5"),
    "arm": ("arm", ""),
    "ppc64le": ("ppc64le", ""),
    "ppc64": ("ppc64", ""),
    "s390x": ("s390x", ""),
    "riscv64": ("riscv64", ""),
    "mips64": ("mips64", ""),
    "mips64el": ("mips64le", ""),
    "mips64le": ("mips64le", ""),
    "loongarch64": ("loong64", ""),
    "loong64": ("loong64", ""),
}


def normalize_arch(arch: str, variant: str = "") -> tuple[str, str]:
    """Map an architecture spelling to (GOARCH, variant) the way containerd does."""
    a = arch.strip().lower()
    v = variant.strip().lower()
    goarch, implied = _ARCH_ALIASES.get(a, (a, ""))
    if not v:
        v = implied
    if goarch == "arm64":
        if v in ("8", "v8"):
            v = ""  # arm64 v8 is the baseline; spell it as no variant
        elif v and not v.startswith("v"):
            v = "v" + v
    elif goarch == "arm":
        if not v:
            v = "v7"  # containerd's default for bare "arm"
        elif not v.startswith("v"):
            v = "v" + v
    elif goarch == "amd64":
        if v == "v1":
            v = ""  # baseline
    return goarch, v


def normalize(p: Platform) -> Platform:
    os_ = (p.os or "").lower()
    if os_ == "macos":
        os_ = "darwin"
    arch, variant = normalize_arch(p.architecture, p.variant)
    return Platform(os_, arch, variant, p.os_version, p.os_features)


def parse(spec: str) -> Platform:
    """Parse "os/arch[/variant]" (or just "arch", taken as linux/arch)."""
    parts = spec.strip().split("/")
    if not spec.strip() or any(not x for x in parts) or len(parts) > 3:
        raise InvalidArgument(f"invalid platform {spec!r}: want os/arch[/variant], e.g. linux/arm64")
    if len(parts) == 1:
        return normalize(Platform("linux", parts[0]))
    return normalize(Platform(parts[0], parts[1], parts[2] if len(parts) == 3 else ""))


def host_platform() -> Platform:
    """This machine's platform (os is always linux for a CRI runtime)."""
    machine = os.uname().machine if hasattr(os, "uname") else _pyplatform.machine()
    arch, variant = normalize_arch(machine)
    return Platform("linux", arch, variant)


def _compatible(want: Platform) -> list[Platform]:
    """Platforms that can run on *want*, best first (want itself first)."""
    w = normalize(want)
    out = [w]
    if w.architecture == "arm64":
        # 32-bit arm code usually runs on arm64 kernels, but only as a last resort.
        out += [Platform(w.os, "arm", v) for v in ("v8", "v7", "v6", "v5")]
    elif w.architecture == "arm" and w.variant.startswith("v") and w.variant[1:].isdigit():
        n = int(w.variant[1:])
        out += [Platform(w.os, "arm", f"v{k}") for k in range(n - 1, 4, -1)]
    elif w.architecture == "amd64":
        if w.variant.startswith("v") and w.variant[1:].isdigit():
            n = int(w.variant[1:])
            out += [Platform(w.os, "amd64", f"v{k}") for k in range(n - 1, 1, -1)]
            out.append(Platform(w.os, "amd64", ""))
        out.append(Platform(w.os, "386", ""))
    return out


class Matcher:
    """Ranks candidate platforms against a wanted one; lower rank is better."""

    def __init__(self, want: Platform | None = None) -> None:
        self.want = normalize(want or host_platform())
        self._order = [(p.os, p.architecture, p.variant) for p in _compatible(self.want)]

    def rank(self, p: Platform | None) -> int | None:
        if p is None:
            return None
        n = normalize(p)
        key = (n.os, n.architecture, n.variant)
        try:
            return self._order.index(key)
        except ValueError:
            return None

    def match(self, p: Platform | None) -> bool:
        return self.rank(p) is not None


def _is_attestation(d: Descriptor) -> bool:
    if d.annotations.get("vnd.docker.reference.type") == "attestation-manifest":
        return True
    return d.platform is not None and d.platform.os == "unknown" and d.platform.architecture == "unknown"


def select_manifest(manifests: Sequence[Descriptor], want: Platform | None = None,
                    what: str = "image index") -> Descriptor:
    """Pick the best manifest for *want* (default: this host) from an index's entries.

    Raises NotFound listing the platforms the index offers when none fits.
    """
    m = Matcher(want)
    best: tuple[int, int, Descriptor] | None = None
    for i, d in enumerate(manifests):
        if _is_attestation(d):
            continue
        r = m.rank(d.platform)
        if r is None:
            continue
        if best is None or (r, i) < best[:2]:
            best = (r, i, d)
    if best is None:
        raise NotFound(
            f"no manifest for platform {m.want} in {what}; available platforms: "
            f"{available_platforms(manifests) or 'none'}")
    return best[2]


#: Platforms named in a "no manifest for this platform" message; an index may list thousands.
MAX_PLATFORMS_SHOWN = 16


def available_platforms(manifests: Iterable[Descriptor]) -> str:
    seen: list[str] = []
    for d in manifests:
        if _is_attestation(d):
            continue
        s = str(d.platform) if d.platform else "(unspecified)"
        if len(s) > 64 or not s.isprintable():  # the registry's text: escaped and cut
            s = clip(s, 64)
        if s not in seen:
            seen.append(s)
    if len(seen) > MAX_PLATFORMS_SHOWN:
        return ", ".join(seen[:MAX_PLATFORMS_SHOWN]) + f" and {len(seen) - MAX_PLATFORMS_SHOWN} more"
    return ", ".join(seen)
