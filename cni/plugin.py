"""Executing one CNI plugin, per the CNI spec (protocol, env, stdin/stdout).

The plugin gets ``CNI_COMMAND``, ``CNI_CONTAINERID``, ``CNI_NETNS``,
``CNI_IFNAME``, ``CNI_ARGS`` and ``CNI_PATH`` in its environment and the network
config on stdin; it answers with a result (ADD), nothing (DEL/CHECK/STATUS),
a version document (VERSION), or on failure an error document
``{"code", "msg", "details"}`` and a non-zero exit.

Each plugin runs in its own session (process group) so a hung plugin and any
children it spawned can be killed by its id when the timeout expires.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from moorage.core.errors import DeadlineExceeded, FailedPrecondition, Internal, InvalidArgument, Unavailable

MAX_OUTPUT = 4 << 20  # a result larger than this is not a result
_STDERR_HEAD = 600

# Well-known error codes (CNI spec, "Error" section).
ERROR_CODES = {
    1: "incompatible CNI version",
    2: "unsupported field in network configuration",
    3: "container unknown or does not exist",
    4: "invalid necessary environment variables",
    5: "I/O failure",
    6: "failed to decode content",
    7: "invalid network config",
    11: "try again later",
    50: "the plugin is not available",
    51: "the plugin is available but with limited connectivity",
}
CODE_TRY_AGAIN = 11
CODE_NOT_AVAILABLE = 50
CODE_LIMITED = 51


class PluginError(Internal):
    """A plugin failed; ``cni_code``/``msg``/``details`` come from its error document.

    The CNI error code is not ``code``: that one is the status name every
    MoorageError carries for the gRPC mapping (here INTERNAL).
    """

    def __init__(self, plugin: str, command: str, code: int | None, msg: str, details: str = "") -> None:
        what = ERROR_CODES.get(code or -1)
        text = f"CNI plugin {plugin} failed on {command}"
        if code is not None:
            text += f" (code {code}{': ' + what if what else ''})"
        text += f": {msg or 'no error message'}"
        if details:
            text += f" ({details})"
        super().__init__(text)
        self.plugin = plugin
        self.command = command
        self.cni_code = code
        self.msg = msg
        self.details = details


class PluginUnavailable(Unavailable):
    """STATUS said the plugin cannot serve ADDs right now (codes 50/51)."""

    def __init__(self, plugin: str, code: int, msg: str) -> None:
        super().__init__(f"CNI plugin {plugin} reports it is not ready (code {code}): {msg}")
        self.plugin = plugin
        self.code_value = code


class PluginNotFound(FailedPrecondition):
    def __init__(self, plugin: str, bin_dirs: Sequence[str]) -> None:
        super().__init__(
            f"CNI plugin binary {plugin!r} not found in {':'.join(bin_dirs) or '(no bin dirs configured)'}; "
            "install the plugin or fix the CNI bin dirs"
        )
        self.plugin = plugin


class PluginTimeout(DeadlineExceeded):
    def __init__(self, plugin: str, command: str, timeout: float, pid: int) -> None:
        super().__init__(
            f"CNI plugin {plugin} did not finish {command} within {timeout:g}s and was killed (pid {pid})"
        )
        self.plugin = plugin


def find_plugin(plugin_type: str, bin_dirs: Sequence[str]) -> str:
    """Absolute path of the plugin binary, first hit in ``bin_dirs``."""
    if not plugin_type or "/" in plugin_type:
        raise InvalidArgument(f"invalid CNI plugin type {plugin_type!r}")
    for d in bin_dirs:
        p = os.path.join(d, plugin_type)
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    raise PluginNotFound(plugin_type, bin_dirs)


def _check_arg(key: str, value: str) -> str:
    if any(c in value for c in ";=\x00"):
        raise InvalidArgument(f"{key} {value!r} cannot be passed in CNI_ARGS (contains ';', '=' or NUL)")
    return value


@dataclass(frozen=True)
class RuntimeArgs:
    """What the runtime passes in the environment (CNI_* variables)."""

    container_id: str
    netns: str  # may be "" for DEL when the namespace is gone
    ifname: str = "eth0"
    args: tuple[tuple[str, str], ...] = ()  # CNI_ARGS key/value pairs

    @staticmethod
    def kubernetes(
        container_id: str,
        netns: str,
        pod_namespace: str,
        pod_name: str,
        pod_uid: str = "",
        ifname: str = "eth0",
    ) -> RuntimeArgs:
        pairs = [
            ("IgnoreUnknown", "1"),
            ("K8S_POD_NAMESPACE", pod_namespace),
            ("K8S_POD_NAME", pod_name),
            ("K8S_POD_INFRA_CONTAINER_ID", container_id),
        ]
        if pod_uid:
            pairs.append(("K8S_POD_UID", pod_uid))
        for k, v in pairs:
            _check_arg(k, v)
        return RuntimeArgs(container_id, netns, ifname, tuple(pairs))

    def cni_args(self) -> str:
        return ";".join(f"{k}={v}" for k, v in self.args)


@dataclass
class PluginExec:
    """Runs plugins found in ``bin_dirs`` with a per-call ``timeout`` (seconds)."""

    bin_dirs: Sequence[str]
    timeout: float = 60.0
    extra_env: Mapping[str, str] = field(default_factory=dict)

    def _env(self, command: str, rt: RuntimeArgs | None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
        env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        env.update(self.extra_env)
        env["CNI_COMMAND"] = command
        env["CNI_PATH"] = os.pathsep.join(self.bin_dirs)
        if rt is not None:
            env["CNI_CONTAINERID"] = rt.container_id
            env["CNI_NETNS"] = rt.netns
            env["CNI_IFNAME"] = rt.ifname
            env["CNI_ARGS"] = rt.cni_args()
        return env

    async def run(
        self,
        plugin_type: str,
        command: str,
        conf: Mapping[str, Any] | None,
        rt: RuntimeArgs | None = None,
    ) -> dict[str, Any] | None:
        """Execute ``command`` on plugin ``plugin_type``; returns its parsed stdout (or None if empty)."""
        path = find_plugin(plugin_type, self.bin_dirs)
        stdin = json.dumps(conf if conf is not None else {}).encode()
        try:
            proc = await asyncio.create_subprocess_exec(
                path,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self._env(command, rt),
                cwd="/",
                start_new_session=True,
            )
        except OSError as exc:
            raise PluginError(plugin_type, command, None, f"cannot execute {path}: {exc.strerror}") from None
        try:
            out, err = await asyncio.wait_for(self._communicate(proc, stdin), self.timeout)
        except TimeoutError:
            self._kill(proc)
            await proc.wait()
            raise PluginTimeout(plugin_type, command, self.timeout, proc.pid) from None
        except BaseException:
            # cancelled (or our own bug): never leave the plugin behind
            self._kill(proc)
            try:
                await asyncio.shield(proc.wait())
            # the exception being handled is re-raised below; a second cancel while reaping must not replace it
            except BaseException:  # noqa: BLE001
                pass
            raise
        return self._interpret(plugin_type, command, proc.returncode or 0, out, err)

    @staticmethod
    async def _communicate(proc: asyncio.subprocess.Process, stdin: bytes) -> tuple[bytes, bytes]:
        async def read_bounded(stream: asyncio.StreamReader) -> bytes:
            buf = bytearray()
            while chunk := await stream.read(65536):
                if len(buf) < MAX_OUTPUT:
                    buf += chunk[: MAX_OUTPUT - len(buf)]
            return bytes(buf)

        async def feed() -> None:
            assert proc.stdin is not None
            try:
                proc.stdin.write(stdin)
                await proc.stdin.drain()
            except (BrokenPipeError, ConnectionResetError):
                pass  # plugin did not read its config; its exit status tells the rest
            finally:
                proc.stdin.close()

        assert proc.stdout is not None and proc.stderr is not None
        _, out, err = await asyncio.gather(feed(), read_bounded(proc.stdout), read_bounded(proc.stderr))
        await proc.wait()
        return out, err

    @staticmethod
    def _kill(proc: asyncio.subprocess.Process) -> None:
        if proc.returncode is not None:
            return
        # The plugin leads its own process group (start_new_session): kill it
        # and whatever it spawned, by that id.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            try:
                proc.kill()
            except ProcessLookupError:
                pass

    @staticmethod
    def _interpret(plugin: str, command: str, rc: int, out: bytes, err: bytes) -> dict[str, Any] | None:
        text = out.strip()
        doc: Any = None
        if text:
            try:
                doc = json.loads(text)
            except (json.JSONDecodeError, UnicodeDecodeError):
                doc = None
        if rc != 0:
            # the head of stderr: where a Go panic or a shell error says what happened
            stderr_head = err.decode("utf-8", "replace").strip()[:_STDERR_HEAD]
            if isinstance(doc, dict) and ("code" in doc or "msg" in doc):
                code = doc.get("code")
                code = code if isinstance(code, int) and not isinstance(code, bool) else None
                msg = str(doc.get("msg") or "")
                details = str(doc.get("details") or "")
                if command == "STATUS" and code in (CODE_NOT_AVAILABLE, CODE_LIMITED):
                    raise PluginUnavailable(plugin, code, msg + (f" ({details})" if details else ""))
                raise PluginError(plugin, command, code, msg, details)
            msg = f"exit status {rc}"
            if rc < 0:
                msg = f"killed by signal {-rc}"
            detail = stderr_head or out.decode("utf-8", "replace").strip()[:_STDERR_HEAD]
            raise PluginError(plugin, command, None, msg + (f": {detail}" if detail else ""))
        if not text:
            return None
        if not isinstance(doc, dict):
            raise PluginError(plugin, command, None, f"printed something that is not a JSON object: {text[:200]!r}")
        return doc

    async def version(self, plugin_type: str, cni_version: str = "1.0.0") -> dict[str, Any]:
        """The plugin's VERSION document (``supportedVersions`` etc.)."""
        doc = await self.run(plugin_type, "VERSION", {"cniVersion": cni_version})
        if not doc or not isinstance(doc.get("supportedVersions"), list):
            raise PluginError(plugin_type, "VERSION", None, "answered without supportedVersions")
        return doc
