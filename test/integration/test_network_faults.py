"""Pod network faults over gRPC: missing, failing and hanging plugins, a daemon killed mid-ADD.

Each test checks that nothing is left behind: no veth on the test's bridge, no
netns pin, no host-local reservation, no CNI cache entry, no sandbox.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import grpc
import pytest

from moorage.cri.api import api_pb2 as pb
from moorage.testing.cri import pod_config, wait_for
from moorage.testing.netlab import (
    NEEDS,
    PLUGIN_DIR,
    fake_passthrough_body,
    links_on_bridge,
    pod_status,
    rpc_error,
    run_pod,
    stop_and_remove,
    write_fake_plugin,
)

pytestmark = [pytest.mark.integration, NEEDS]


def assert_nothing_left(lab, d) -> None:
    assert links_on_bridge(lab.bridge) == []
    assert lab.netns_pins(d) == []
    assert lab.reservations() == []
    assert lab.cache_entries(d) == []
    assert d.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items == []


def test_missing_plugin_binary_is_named_with_search_path(netlab, daemon_factory):
    conf = netlab.conflist([{"type": "mrg-no-such-plugin"}], portmap=False, bandwidth=False)
    d = netlab.daemon(daemon_factory, conf=conf)
    err = rpc_error(run_pod, d, pod_config("net-missing"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "'mrg-no-such-plugin' not found in" in err.details()
    assert f"{netlab.bin_dir}:{PLUGIN_DIR}" in err.details()
    assert_nothing_left(netlab, d)  # the bridge plugin that did run got its DEL


def test_plugin_error_message_reaches_the_caller(netlab, daemon_factory):
    write_fake_plugin(netlab.bin_dir, "mrg-fail", (
        'if [ "$CNI_COMMAND" = ADD ]; then\n'
        '  echo \'{"cniVersion":"1.0.0","code":7,"msg":"fake plugin says no","details":"frob quota exhausted"}\'\n'
        "  exit 1\nfi\nexit 0"))
    d = netlab.daemon(daemon_factory, conf=netlab.conflist([{"type": "mrg-fail"}], bandwidth=False))
    err = rpc_error(run_pod, d, pod_config("net-fail"))
    assert "CNI plugin mrg-fail failed on ADD (code 7: invalid network config): fake plugin says no" in err.details()
    assert "frob quota exhausted" in err.details()
    assert_nothing_left(netlab, d)


def test_hung_plugin_times_out_and_everything_is_cleaned(netlab, daemon_factory):
    marker = os.path.join(netlab.root, "hang.pid")
    write_fake_plugin(netlab.bin_dir, "mrg-hang", fake_passthrough_body(f"  echo $$ > {marker}\n  exec sleep 3600"))
    d = netlab.daemon(daemon_factory, cni="plugin_timeout = 2.0",
                      conf=netlab.conflist([{"type": "mrg-hang"}], bandwidth=False))
    err = rpc_error(run_pod, d, pod_config("net-hang"))
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "CNI plugin mrg-hang did not finish ADD within 2s and was killed" in err.details()
    pid = int(Path(marker).read_text())
    netlab.fake_pids.append(pid)
    assert not os.path.exists(f"/proc/{pid}") or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    assert_nothing_left(netlab, d)


def test_daemon_killed_during_add_releases_ip_and_veth_on_restart(netlab, daemon_factory):
    marker = os.path.join(netlab.root, "slow.pid")
    write_fake_plugin(netlab.bin_dir, "mrg-slow", fake_passthrough_body(f"  echo $$ > {marker}\n  exec sleep 3600"))
    d = netlab.daemon(daemon_factory, conf=netlab.conflist([{"type": "mrg-slow"}]))

    call = d.runtime.RunPodSandbox.future(pb.RunPodSandboxRequest(config=pod_config("net-crash")), timeout=120)
    wait_for(lambda: os.path.exists(marker) and Path(marker).read_text().strip(), 60, what="the slow plugin's ADD")
    netlab.fake_pids.append(int(Path(marker).read_text()))
    # the bridge plugin has run: a veth and an address exist, the sandbox is not recorded as made
    assert len(links_on_bridge(netlab.bridge)) == 1 and len(netlab.reservations()) == 1
    (entry,) = netlab.cache_entries(d)
    assert entry["state"] == "adding"
    sid = entry["containerId"]
    assert sid in netlab.netns_pins(d)

    d.kill9()
    with pytest.raises(grpc.RpcError):
        call.result()
    for pid in netlab.fake_pids:  # the orphaned plugin (its own session) is ours to end
        os.kill(pid, 9)
    os.unlink(marker)
    d.start()
    assert_nothing_left(netlab, d)
    err = rpc_error(pod_status, d, sid)
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_failed_run_does_not_block_a_retry(netlab, daemon_factory):
    """After a plugin failure the same pod name can be retried once the plugin works."""
    flag = os.path.join(netlab.root, "fail-once")
    open(flag, "w").close()
    write_fake_plugin(netlab.bin_dir, "mrg-flaky", (
        f'if [ "$CNI_COMMAND" = ADD ] && [ -e {flag} ]; then\n'
        f'  rm -f {flag}\n'
        '  echo \'{"cniVersion":"1.0.0","code":11,"msg":"try again"}\'; exit 1\nfi\n'
        + fake_passthrough_body()))
    d = netlab.daemon(daemon_factory, conf=netlab.conflist([{"type": "mrg-flaky"}], bandwidth=False))
    cfg = pod_config("net-retry")
    err = rpc_error(run_pod, d, cfg)
    assert "try again" in err.details()
    assert_nothing_left(netlab, d)
    sid = run_pod(d, cfg)
    assert pod_status(d, sid).network.ip
    assert len(links_on_bridge(netlab.bridge)) == 1
    stop_and_remove(d, sid)
    assert_nothing_left(netlab, d)


def test_parallel_pods_get_distinct_addresses(netlab, daemon_factory):
    d = netlab.daemon(daemon_factory)
    sids: list[str] = []
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            sids.append(run_pod(d, pod_config(f"net-par-{i}")))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    ips = [pod_status(d, s).network.ip for s in sids]
    assert len(set(ips)) == 8 and sorted(ips) == netlab.reservations()
    assert len(links_on_bridge(netlab.bridge)) == 8
    for s in sids:
        stop_and_remove(d, s)
    assert_nothing_left(netlab, d)


def test_network_left_by_a_failed_teardown_is_released_after_restart(netlab, daemon_factory):
    """A forced RemovePodSandbox whose DEL fails keeps the cache entry; the next start DELs it."""
    flag = os.path.join(netlab.root, "fail-del")
    calls = os.path.join(netlab.root, "del-calls")
    write_fake_plugin(netlab.bin_dir, "mrg-faildel", (
        f'if [ "$CNI_COMMAND" = DEL ]; then\n  echo "$CNI_CONTAINERID" >> {calls}\n'
        f'  if [ -e {flag} ]; then echo \'{{"cniVersion":"1.0.0","code":5,"msg":"cannot delete"}}\'; exit 1; fi\nfi\n'
        + fake_passthrough_body()))
    d = netlab.daemon(daemon_factory, conf=netlab.conflist([{"type": "mrg-faildel"}], bandwidth=False))
    sid = run_pod(d, pod_config("net-faildel"))
    open(flag, "w").close()
    d.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=120)
    assert d.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items == []
    assert [e["containerId"] for e in netlab.cache_entries(d)] == [sid]  # kept: its DEL failed
    assert netlab.reservations() == [] and links_on_bridge(netlab.bridge) == []  # the bridge DEL did run

    os.unlink(flag)
    d.stop()
    d.start()
    wait_for(lambda: netlab.cache_entries(d) == [], 30, what="the orphaned network to be released")
    assert Path(calls).read_text().split() == [sid, sid]
    assert_nothing_left(netlab, d)
