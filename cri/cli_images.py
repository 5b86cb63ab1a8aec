"""``moorage images …``: pull, ls, rm (through the daemon's socket) and import/export (offline).

pull/ls/rm are CRI calls on the daemon's socket (``--socket``, default from the config), so
they behave exactly as the kubelet's would.  The CRI has no call for archives, so import and
export work on the root directory's store directly (``--root``, default from the config).
That is safe while a daemon runs on the same root: both hold the image GC lock shared, the
daemon's GC and start-up cleaning wait for them, and the daemon sees an imported image at once
(the store is the one source of truth).  This is what air-gapped nodes need: copy a tar
over, ``moorage images import`` it, and the kubelet finds the image.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.request
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO

from moorage.core.errors import InvalidArgument, MoorageError, NotFound, Unavailable
from moorage.cri import cli_root
from moorage.cri import config as configmod

if TYPE_CHECKING:  # imported where used: `moorage images ls` should not pay for them
    from moorage.core.store import Store
    from moorage.images.registry import Credentials
    from moorage.images.service import ImageService


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("images", help="pull, list, remove, import and export images")
    isub = p.add_subparsers(dest="images_cmd", required=True)

    def common(sp: argparse.ArgumentParser, socket: bool = True, root: bool = False) -> None:
        sp.add_argument("--config", help=f"TOML config file (default {configmod.DEFAULT_CONFIG_PATH} if present)")
        if socket:
            sp.add_argument("--socket", help="the daemon's gRPC socket (default: from the config)")
            sp.add_argument("--timeout", type=float, default=0, help="seconds (default: none for pull, 60 otherwise)")
        if root:
            sp.add_argument("--root", help="the daemon's root dir (default: from the config)")

    s = isub.add_parser("pull", help="pull an image through the daemon, with progress on stderr")
    common(s)
    s.add_argument("ref")
    s.add_argument("--creds", help="USER:PASSWORD for the registry")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress; print only the image id")
    s.set_defaults(func=_cmd_pull)

    s = isub.add_parser("ls", aliases=["list"], help="list images")
    common(s)
    s.add_argument("ref", nargs="?", help="only this image")
    s.add_argument("-q", "--quiet", action="store_true", help="image ids only")
    s.add_argument("--digests", action="store_true", help="show repo digests")
    s.set_defaults(func=_cmd_ls)

    s = isub.add_parser("rm", aliases=["rmi"], help="remove images (by reference, id or digest)")
    common(s)
    s.add_argument("refs", nargs="+")
    s.set_defaults(func=_cmd_rm)

    s = isub.add_parser("import", help="import an OCI layout or docker save archive (offline)")
    common(s, socket=False, root=True)
    s.add_argument("file")
    s.add_argument("--base-name", help="repository for entries tagged only by a bare tag (e.g. docker.io/library/x)")
    s.set_defaults(func=_cmd_import)

    s = isub.add_parser("export", help="export images to an OCI layout tar (also docker-loadable)")
    common(s, socket=False, root=True)
    s.add_argument("ref")
    s.add_argument("file")
    s.add_argument("--also", action="append", default=[], metavar="REF", help="more images for the same file")
    s.set_defaults(func=_cmd_export)


# --- helpers -------------------------------------------------------------------------------------

def _cfg(args: argparse.Namespace) -> configmod.Config:
    cfg = cli_root.load_config(args)  # --config, --root
    if getattr(args, "socket", None):
        cfg.socket = args.socket
    return cfg


def _stubs(cfg: configmod.Config) -> tuple[Any, Any]:
    import grpc

    from moorage.cri.api import api_pb2_grpc as pbg

    if not os.path.exists(cfg.socket):
        raise Unavailable(f"no daemon socket at {cfg.socket}; is `moorage serve` running? (--socket PATH)")
    ch = grpc.insecure_channel(f"unix://{cfg.socket}")
    return ch, pbg.ImageServiceStub(ch)


def _rpc(fn: Callable[..., Any], req: Any, timeout: float | None) -> Any:
    import grpc

    try:
        return fn(req, timeout=timeout)
    except grpc.RpcError as e:
        code = e.code()
        err = MoorageError(e.details() or str(code))
        err.code = code.name if code else "UNKNOWN"
        raise err from None


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"  # pragma: no cover


# --- pull with progress ------------------------------------------------------------------------

def _pulls_url(cfg: configmod.Config) -> str | None:
    """Where the daemon serves its pulls' progress: ``/debug/pulls`` on its metrics address
    (a wildcard listen address is reached on loopback)."""
    if not cfg.metrics.enabled:
        return None
    host, _, port = cfg.metrics.address.rpartition(":")
    host = host.strip("[]")
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/debug/pulls"


class _Progress:
    """Progress of a pull the daemon runs, as the daemon reports it (``/debug/pulls``).

    The daemon keeps per-pull numbers (bytes done and total per layer); this only polls
    and draws them.  When the endpoint cannot be reached (metrics off, another address),
    it degrades to a spinner.
    """

    def __init__(self, cfg: configmod.Config, ref: str, out: TextIO = sys.stderr) -> None:
        self.url = _pulls_url(cfg)
        self.ref = ref
        self.out = out
        self.pull: dict[str, Any] | None = None  # the daemon's latest report on our pull
        self.tty = out.isatty()
        self._last_line = 0.0
        self._t0 = time.monotonic()
        self._started_wall = time.time()

    def poll(self) -> None:
        """Fetch the daemon's report and pick our pull: the newest one of this reference
        that is in flight or ended after we started (a pull of the same reference already
        in flight when we asked is the one the daemon joins us to)."""
        if self.url is None:
            return
        try:
            # loopback: never through an http_proxy from the environment
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            with opener.open(self.url, timeout=2) as resp:
                pulls = json.loads(resp.read()).get("pulls") or []
        except (OSError, ValueError):
            return
        mine = [p for p in pulls if p.get("ref") == self.ref
                and (not p.get("finished_at") or p["finished_at"] >= self._started_wall - 1)]
        if self.pull is not None:  # once chosen, stay with it while the daemon shows it
            same = [p for p in mine if p.get("id") == self.pull.get("id")]
            mine = same or mine
        if mine:
            self.pull = max(mine, key=lambda p: p.get("id", 0))

    def render(self, final: bool = False) -> None:
        now = time.monotonic()
        if not self.tty and not final and now - self._last_line < 1.0:
            return
        self._last_line = now
        self.poll()
        elapsed = now - self._t0
        p = self.pull
        total = int(p.get("total_bytes", 0)) if p else 0
        if p and p.get("layers"):
            done = total if final else min(int(p.get("done_bytes", 0)), total)
            total = total or 1
            width = 30
            filled = int(width * done / total)
            bar = "#" * filled + "." * (width - filled)
            line = (f"{self.ref}: [{bar}] {100 * done // total:3d}% {_size(done)}/{_size(total)} "
                    f"{len(p['layers'])} layer(s) {elapsed:.1f}s")
        else:
            spin = "|/-\\"[int(elapsed * 4) % 4]
            line = f"{self.ref}: {'pulled' if final else 'pulling ' + spin} {elapsed:.1f}s"
        if self.tty:
            self.out.write("\r\x1b[K" + line + ("\n" if final else ""))
        else:
            self.out.write(line + "\n")
        self.out.flush()


def _parse_creds(s: str | None) -> Credentials | None:
    from moorage.images.registry import Credentials

    if not s:
        return None
    user, sep, password = s.partition(":")
    if not sep or not user:
        raise InvalidArgument("--creds must be USER:PASSWORD")
    return Credentials(username=user, password=password)


def _cmd_pull(args: argparse.Namespace) -> int:
    from moorage.cri.api import api_pb2 as pb
    from moorage.images.reference import parse_reference

    cfg = _cfg(args)
    ref = str(parse_reference(args.ref))  # say what is wrong before asking anyone
    creds = _parse_creds(args.creds)
    ch, images = _stubs(cfg)
    try:
        req = pb.PullImageRequest(image=pb.ImageSpec(image=args.ref))
        if creds is not None:
            req.auth.username, req.auth.password = creds.username, creds.password
        fut = images.PullImage.future(req, timeout=args.timeout or None)
        progress = None if args.quiet else _Progress(cfg, ref)
        while not fut.done():
            if progress is not None:
                progress.render()
            time.sleep(0.1)
        resp = _rpc(lambda r, timeout: fut.result(), None, None)
        if progress is not None:
            progress.render(final=True)
        print(resp.image_ref)
        return 0
    finally:
        ch.close()


def _cmd_ls(args: argparse.Namespace) -> int:
    from moorage.cri.api import api_pb2 as pb

    cfg = _cfg(args)
    ch, images = _stubs(cfg)
    try:
        req = pb.ListImagesRequest()
        if args.ref:
            req.filter.image.image = args.ref
        imgs = _rpc(images.ListImages, req, args.timeout or 60).images
    finally:
        ch.close()
    if args.quiet:
        for i in imgs:
            print(i.id)
        return 0
    rows = [("IMAGE", "TAG", *(("DIGEST",) if args.digests else ()), "IMAGE ID", "SIZE", "PINNED")]
    for i in sorted(imgs, key=lambda i: (list(i.repo_tags) or list(i.repo_digests) or [i.id])[0]):
        short = i.id.removeprefix("sha256:")[:13]
        digest = (i.repo_digests[0].split("@", 1)[1].removeprefix("sha256:")[:13]) if i.repo_digests else "<none>"
        refs = [(t.rsplit(":", 1)[0], t.rsplit(":", 1)[1]) for t in i.repo_tags] or \
               [(d.split("@", 1)[0], "<none>") for d in i.repo_digests[:1]] or [("<none>", "<none>")]
        for repo, tag in refs:
            rows.append((repo, tag, *((digest,) if args.digests else ()), short, _size(i.size),
                         "true" if i.pinned else "false"))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    return 0


def _cmd_rm(args: argparse.Namespace) -> int:
    from moorage.cri.api import api_pb2 as pb

    cfg = _cfg(args)
    ch, images = _stubs(cfg)
    rc = 0
    try:
        for ref in args.refs:
            st = _rpc(images.ImageStatus, pb.ImageStatusRequest(image=pb.ImageSpec(image=ref)), args.timeout or 60)
            if not st.HasField("image") or not st.image.id:
                print(f"moorage: no such image: {ref}", file=sys.stderr)
                rc = 1
                continue
            _rpc(images.RemoveImage, pb.RemoveImageRequest(image=pb.ImageSpec(image=ref)), args.timeout or 60)
            print(f"Deleted: {ref}")
    finally:
        ch.close()
    return rc


def _offline_service(cfg: configmod.Config) -> tuple[ImageService, Store]:
    from moorage.core.store import Store
    from moorage.cri.services import image_settings
    from moorage.images.service import ImageService

    store = Store(cfg.root_dir, cfg.namespace)
    return ImageService(image_settings(cfg), store), store


def _cmd_import(args: argparse.Namespace) -> int:
    from moorage.images import archive

    cfg = _cfg(args)
    if not os.path.isfile(args.file):
        raise NotFound(f"{args.file}: no such file")
    svc, store = _offline_service(cfg)
    try:
        out = archive.import_archive(svc, args.file, base_name=args.base_name)
    finally:
        store.close()
    for imp in out:
        names = ", ".join(imp.refs) or "(untagged)"
        print(f"imported {imp.record.id} {names}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from moorage.images import archive

    cfg = _cfg(args)
    svc, store = _offline_service(cfg)
    try:
        recs = archive.export_images(svc, [args.ref, *args.also], args.file)
    finally:
        store.close()
    for r in recs:
        print(f"exported {r.id} {', '.join(r.repo_tags) or '(untagged)'}")
    return 0
