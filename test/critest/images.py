#!/usr/bin/env python3
"""Build critest's offline stand-in images, push them to a local registry, write mirrors.

    python test/critest/images.py --registry 127.0.0.1:PORT --certs-d DIR [--work DIR]

Builds ``moorage.testing.testimages.build_critest_images`` (busybox-static based, no network),
pushes every image to ``http://<registry>/<upstream path>`` under its tags, and writes one
containerd-style ``DIR/<upstream host>/hosts.toml`` per upstream registry (registry.k8s.io,
k8s.gcr.io, gcr.io, docker.io) whose only mirror is the local registry (pull + resolve).
Prints a JSON summary: upstream reference -> pushed reference and digest.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile

from moorage.images.registry import RegistryClient
from moorage.testing.registry import push_layout
from moorage.testing.testimages import build_critest_images

UPSTREAM_HOSTS = ("registry.k8s.io", "k8s.gcr.io", "gcr.io", "docker.io")


def write_mirrors(certs_d: str, registry: str) -> None:
    for host in UPSTREAM_HOSTS:
        d = os.path.join(certs_d, host)
        os.makedirs(d, exist_ok=True)
        server = "https://registry-1.docker.io" if host == "docker.io" else f"https://{host}"
        with open(os.path.join(d, "hosts.toml"), "w") as f:
            f.write(f'server = "{server}"\n\n[host."http://{registry}"]\n  capabilities = ["pull", "resolve"]\n')


async def push_all(registry: str, images: dict) -> dict:
    out = {}
    async with RegistryClient(trust_env=False, retries=2, backoff=0.1) as c:
        for name, img in sorted(images.items()):
            repo = f"{registry}/{img.repository}"
            digest = await push_layout(c, repo, img.layout)
            out[img.upstream] = {"name": name, "pushed": [f"{repo}:{t}" for t in img.layout.tags],
                                 "digest": digest}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--registry", required=True, help="host:port of a plain-HTTP registry on loopback")
    ap.add_argument("--certs-d", required=True, help="certs.d directory to write hosts.toml mirrors into")
    ap.add_argument("--work", help="where to build the OCI layouts (default: a temp dir under /tmp)")
    args = ap.parse_args(argv)
    work = args.work or tempfile.mkdtemp(prefix="mrg-critest-images-")
    images = build_critest_images(work)
    summary = asyncio.run(push_all(args.registry, images))
    write_mirrors(args.certs_d, args.registry)
    json.dump(summary, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
