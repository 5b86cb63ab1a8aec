import os

import pytest

pytest_plugins = ["test.fixtures.daemon"]
if os.path.exists(os.path.join(os.path.dirname(__file__), "fixtures", "registry.py")):
    pytest_plugins.append("test.fixtures.registry")


def pytest_collection_modifyitems(config, items):
    # Tests under test/integration need root and the real runtime parts.
    for item in items:
        if "/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
