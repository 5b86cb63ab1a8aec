"""Runtime failures (runc/crun/conmon said no) are domain errors: gRPC UNKNOWN, not INTERNAL."""

from __future__ import annotations

import grpc

from moorage.core.errors import Internal, RuntimeFailure
from moorage.cri.errors import status_for
from moorage.runtime.oci import OCIRuntimeError, _classify


def test_runtime_refusal_maps_to_unknown_with_the_runtime_message():
    err = _classify("cannot set hugetlb limit: container could not join or create cgroup", "c1", "runc create")
    assert isinstance(err, OCIRuntimeError) and isinstance(err, RuntimeFailure)
    assert not isinstance(err, Internal)
    code, msg = status_for(err)
    assert code is grpc.StatusCode.UNKNOWN
    assert msg == "runc create container c1: cannot set hugetlb limit: container could not join or create cgroup"


def test_runtime_message_is_bounded():
    err = OCIRuntimeError("x" * 100_000)
    assert len(err.message) < RuntimeFailure.MAX_MESSAGE + 100
    assert err.message.endswith("more characters cut)")
    assert RuntimeFailure("short").message == "short"


def test_bugs_stay_internal():
    assert status_for(Internal("bug"))[0] is grpc.StatusCode.INTERNAL
    assert status_for(KeyError("x"))[0] is grpc.StatusCode.INTERNAL
