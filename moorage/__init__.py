"""moorage: a Kubernetes container runtime (CRI v1) in Python.

The import root of one distribution.  The layers, top to bottom (see
``docs/architecture.md``; ``test/unit/test_layers.py`` keeps the rule):

``moorage.cri``        the gRPC edge, servicers, streaming server, config, CLI
``moorage.runtime``    sandboxes and containers, OCI spec, runc/conmon, stats
``moorage.images``     references, registries, content store, unpack, snapshots
``moorage.cni``        CNI config, plugin execution, pod networks
``moorage.core``       the ground floor: errors, the metadata store, mounts,
                       network namespaces, ids
``moorage.testing``    public helpers for tests and benchmarks
"""

__version__ = "0.1.0"
