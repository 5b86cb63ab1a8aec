"""Remote command protocol pieces: negotiation, streams, status, resize, session outcome."""

from __future__ import annotations

import asyncio
import json

import pytest

from moorage.core.errors import NotFound
from moorage.cri.streaming import remotecommand as rc
from moorage.cri.streaming.backend import ByteQueue


def test_negotiation_prefers_the_clients_order():
    assert rc.negotiate(["v4.channel.k8s.io", "v3.channel.k8s.io"], rc.SPDY_PROTOCOLS) == "v4.channel.k8s.io"
    assert rc.negotiate(["v9", "channel.k8s.io"], rc.SPDY_PROTOCOLS) == "channel.k8s.io"
    assert rc.negotiate(["v5.channel.k8s.io"], rc.SPDY_PROTOCOLS) is None
    assert rc.split_header_values(["v4.channel.k8s.io, v3.channel.k8s.io", " channel.k8s.io ,"]) == [
        "v4.channel.k8s.io", "v3.channel.k8s.io", "channel.k8s.io"
    ]  # fmt: skip


@pytest.mark.parametrize(
    "proto, tty, expected",
    [
        (rc.V4, True, {"error", "stdin", "stdout", "resize"}),
        (rc.V3, True, {"error", "stdin", "stdout", "resize"}),
        (rc.V2, True, {"error", "stdin", "stdout"}),
        (rc.V1, False, {"error", "stdin", "stdout"}),
    ],
)
def test_expected_streams(proto, tty, expected):
    assert rc.expected_streams(proto, stdin=True, stdout=True, stderr=False, tty=tty) == expected


def test_success_status_bytes():
    assert rc.encode_status(rc.status_success(), json_status=True) == b'{"metadata":{},"status":"Success"}'
    assert rc.encode_status(rc.status_success(), json_status=False) == b""


def test_exit_code_status():
    data = rc.encode_status(rc.status_exit_code(42), json_status=True)
    status = json.loads(data)
    assert status["status"] == "Failure" and status["reason"] == "NonZeroExitCode"
    assert status["details"] == {"causes": [{"reason": "ExitCode", "message": "42"}]}
    assert rc.decode_status(data, json_status=True) == 42
    assert rc.decode_status(b'{"metadata":{},"status":"Success"}', json_status=True) == 0


def test_failure_status_decodes_to_error():
    data = rc.encode_status(rc.status_internal_error("boom"), json_status=True)
    assert json.loads(data)["code"] == 500
    with pytest.raises(rc.RemoteCommandError, match="boom"):
        rc.decode_status(data, json_status=True)
    with pytest.raises(rc.RemoteCommandError, match="boom"):
        rc.decode_status(rc.encode_status(rc.status_internal_error("boom"), json_status=False), json_status=False)
    with pytest.raises(rc.RemoteCommandError):
        rc.decode_status(b"not json", json_status=True)


def test_resize_decoder_handles_split_and_batched_events():
    d = rc.ResizeDecoder()
    assert d.feed(b'{"Width":80,') == []
    assert d.feed(b'"Height":24}\n{"Width":1') == [(80, 24)]
    assert d.feed(b'00,"Height":40}{"Width":1,"Height":2}') == [(100, 40), (1, 2)]
    assert d.feed(rc.encode_resize(132, 43)) == [(132, 43)]
    assert d.feed(b'{"Width":-1,"Height":5}') == []  # out of range: dropped


def test_resize_decoder_gives_up_on_garbage():
    with pytest.raises(ValueError):
        rc.ResizeDecoder().feed(b"{" + b"x" * 5000)


# --------------------------------------------------------------------------- run_command


class FakeIO:
    def __init__(self, json_status=True):
        self.log: list = []
        self.disconnected = asyncio.Event()
        self.stdin = ByteQueue()
        self.resize = ByteQueue()

        async def out(data):
            self.log.append(("stdout", data))

        async def close_output():
            self.log.append(("close",))

        async def write_status(data):
            self.log.append(("status", data))

        self.io = rc.CommandIO(self.stdin, out, None, self.resize, close_output, write_status, self.disconnected, json_status)


def test_run_command_reports_exit_code_after_output():
    async def main():
        f = FakeIO()
        f.resize.feed(rc.encode_resize(10, 20))
        f.resize.feed_eof()

        async def call(stdin, stdout, stderr, resize):
            assert stderr is None
            assert [s async for s in resize] == [(10, 20)]
            await stdout(b"x")
            return 3

        await rc.run_command(f.io, call)
        assert f.log[:2] == [("stdout", b"x"), ("close",)]
        assert rc.decode_status(f.log[2][1], True) == 3

    asyncio.run(main())


def test_run_command_reports_domain_errors():
    async def main():
        f = FakeIO(json_status=False)

        async def call(*_):
            raise NotFound("container c1 not found")

        await rc.run_command(f.io, call)
        assert f.log[-1] == ("status", b"Internal error occurred: error executing command in container: container c1 not found")

    asyncio.run(main())


def test_run_command_cancels_backend_on_disconnect():
    async def main():
        f = FakeIO()
        started, cancelled = asyncio.Event(), asyncio.Event()

        async def call(*_):
            started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise

        runner = asyncio.create_task(rc.run_command(f.io, call))
        await started.wait()
        f.disconnected.set()
        await runner
        assert cancelled.is_set() and f.log == []

    asyncio.run(main())
