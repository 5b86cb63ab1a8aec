"""The suite's fixtures come from the public test-support package ``moorage.testing``."""

from __future__ import annotations

import pytest

pytest_plugins = [
    "moorage.testing.daemon",     # daemon, daemon_factory
    "moorage.testing.registry",   # registry, tls/token registries
    "moorage.testing.runtime_env",  # module_env, env
    "moorage.testing.netlab",     # netlab
]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Tests under test/integration need root and the real runtime parts.
    for item in items:
        if "/integration/" in str(item.path):
            item.add_marker(pytest.mark.integration)
