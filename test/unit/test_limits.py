"""cri/limits.py: the labels+annotations budget and the response cap (issue #14)."""

from __future__ import annotations

import pytest

from moorage.core.errors import InvalidArgument, ResourceExhausted
from moorage.cri.limits import (
    EXEC_SYNC_RESERVE,
    KUBELET_MAX_MESSAGE,
    MAX_RESPONSE_ENV,
    check_metadata,
    max_response_bytes,
    response_too_large,
)


@pytest.mark.parametrize("labels,annotations", [
    ({}, {}),
    ({"a": "b" * 98}, {}),  # one: 1 + 98 bytes
    ({"a": "1", "b": "2"}, {"c": "3" * 94}),  # many: 2 + 2 + 1 + 94
])
def test_at_or_under_the_limit_passes(labels: dict[str, str], annotations: dict[str, str]) -> None:
    check_metadata("pod sandbox 'p'", labels, annotations, 99)


def test_one_byte_over_is_refused_naming_the_object_and_the_limit() -> None:
    with pytest.raises(ResourceExhausted) as e:
        check_metadata("pod sandbox 'p'", {"a": "1"}, {"b": "2" * 97}, 99)
    assert "pod sandbox 'p'" in e.value.message and "99 bytes" in e.value.message
    assert "limits.max_labels_annotations_bytes" in e.value.message


def test_bytes_not_characters_are_counted() -> None:
    check_metadata("x", {"k": "é" * 4}, {}, 9)  # 1 + 8 bytes
    with pytest.raises(ResourceExhausted):
        check_metadata("x", {"k": "é" * 4}, {}, 8)


def test_message_never_echoes_the_content() -> None:
    big = {f"key-{i}": "secret-value" * 100 for i in range(1000)}
    with pytest.raises(ResourceExhausted) as e:
        check_metadata("container 'c'", big, {}, 1024)
    assert "secret-value" not in e.value.message and len(e.value.message) < 300


def test_response_too_large_points_to_the_stream_rpc() -> None:
    e = response_too_large("ListPodSandbox", 20_000_000, KUBELET_MAX_MESSAGE)
    assert "20000000 bytes" in e.message and str(KUBELET_MAX_MESSAGE) in e.message
    assert "StreamPodSandboxes" in e.message and "filter" in e.message
    assert "Stream" not in response_too_large("ExecSync", 20_000_000, KUBELET_MAX_MESSAGE).message


def test_response_cap_env() -> None:
    assert max_response_bytes({}) == KUBELET_MAX_MESSAGE
    assert max_response_bytes({MAX_RESPONSE_ENV: "1048576"}) == 1048576
    for bad in ("lots", str(KUBELET_MAX_MESSAGE + 1), str(EXEC_SYNC_RESERVE)):
        with pytest.raises(InvalidArgument):
            max_response_bytes({MAX_RESPONSE_ENV: bad})


def test_exec_sync_cap_keeps_the_response_under_the_cap() -> None:
    from moorage.cri import config as c
    from moorage.cri.services import runtime_settings

    assert runtime_settings(c.loads("")).exec_sync_max_output == KUBELET_MAX_MESSAGE - EXEC_SYNC_RESERVE
    small = c.loads("[runtime]\nexec_sync_max_output = 1024", "test.toml")
    assert runtime_settings(small).exec_sync_max_output == 1024
    assert runtime_settings(c.loads(""), 1 << 20).exec_sync_max_output == (1 << 20) - EXEC_SYNC_RESERVE


def test_status_messages_are_bounded() -> None:
    import grpc

    from moorage.core.errors import MAX_MESSAGE
    from moorage.cri.errors import status_for

    code, msg = status_for(InvalidArgument("argv: " + "x" * 200_000))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert len(msg) < MAX_MESSAGE + 64 and msg.endswith("more characters cut)")
    assert status_for(InvalidArgument("short"))[1] == "short"
