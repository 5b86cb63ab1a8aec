"""The shipped example config is valid and names only real keys."""

import os

from moorage.cri import config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_example_config_is_valid():
    cfg = config.load(os.path.join(REPO, "manifests", "config.toml"))
    assert cfg.runtime.default_handler == "runc"
    assert cfg.metrics.address == "127.0.0.1:9464"
