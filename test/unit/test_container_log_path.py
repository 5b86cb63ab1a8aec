"""CRI log paths stay inside the pod's log directory (runtime.container.container_log_path)."""

import pytest

from moorage.core.errors import InvalidArgument
from moorage.runtime.container import container_log_path


def test_relative_and_absolute_paths_join_under_the_log_directory():
    assert container_log_path("/var/log/pods/p", "c/0.log") == "/var/log/pods/p/c/0.log"
    assert container_log_path("/var/log/pods/p", "/c/0.log") == "/var/log/pods/p/c/0.log"
    assert container_log_path("/var/log/pods/p/", "a/../c/0.log") == "/var/log/pods/p/c/0.log"


@pytest.mark.parametrize("path", ["../x.log", "c/../../x.log", "/../../etc/cron.d/x", "..", ".", "/"])
def test_paths_leaving_the_log_directory_are_refused(path):
    with pytest.raises(InvalidArgument):
        container_log_path("/var/log/pods/p", path)


def test_no_log_directory():
    assert container_log_path("", "") == ""
    assert container_log_path("/var/log/pods/p", "") == ""
    assert container_log_path("", "c/0.log") == ""  # nowhere to put it: no log file, as containerd
    with pytest.raises(InvalidArgument):
        container_log_path("", "/etc/cron.d/evil")
    with pytest.raises(InvalidArgument):
        container_log_path("relative/dir", "c.log")
