"""``livemig remote-target ACTION``: what livemig runs on a target host, through ssh.

One JSON object on stdin, one on stdout, exit 0; an input error is exit 2 with
``{"error": …}``. Nothing here listens on the network or outlives the command but the target
QEMU a ``launch`` starts (detached, as ``--to local`` starts it: `livemig.drivers.launch`).

- ``probe``: what the migration needs of this host, read-only: the livemig and QEMU versions,
  whether the target dir can be made and how much space its file system has, the TLS files
  (the public certificates are returned for the source to check against its CA), which of the
  given marker files this host sees with the given content (shared storage: see
  `livemig.remote`), and free TCP ports on the given address.
- ``launch``: carry out a `LaunchPlan` (`start_local_target`) and return the `LocalTarget`.
- ``remove``: `LocalTarget.remove`: stop that QEMU, delete what its launch created.
- ``launch`` also starts the target's monitor relay (`livemig.relay`), detached beside it:
  livemig's forward reaches the relay, which holds QEMU's monitor on this host.
- ``unrelay``: stop that relay (once the guest runs there: the monitor is the operator's).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import attrs
import trio

from livemig.drivers.launch import LaunchPlan, LocalTarget, start_local_target
from livemig.transports.errors import LivemigError, ProcessError, UsageError

__all__ = ["main", "probe"]

#: The TLS files a target host needs (QEMU's x509 layout, server side).
SERVER_FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem")


def version() -> str:
    try:
        return metadata.version("livemig")
    except metadata.PackageNotFoundError:  # pragma: no cover - run from a checkout
        return "unknown"


def probe(request: Mapping[str, Any]) -> dict[str, Any]:
    """Answer a ``probe`` request (see the module's documentation). Read-only but for the
    ports, which are bound and released at once."""
    directory = Path(str(request["directory"]))
    answer: dict[str, Any] = {"livemig": version()}
    qemu = shutil.which(str(request.get("qemu") or "qemu-system-x86_64"))
    answer["qemu_path"] = qemu
    answer["qemu_version"] = None
    if qemu is not None:
        out = subprocess.run([qemu, "--version"], capture_output=True, text=True, check=False)
        answer["qemu_version"] = out.stdout.splitlines()[0] if out.returncode == 0 else None
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    answer["dir_problem"] = None
    if directory.exists() and not directory.is_dir():
        answer["dir_problem"] = f"{directory} exists and is not a directory"
    elif not os.access(existing, os.W_OK | os.X_OK):
        answer["dir_problem"] = f"{existing} is not writable"
    answer["free_bytes"] = shutil.disk_usage(existing).free
    tls_dir = request.get("tls_dir")
    if tls_dir is not None:
        tls = Path(str(tls_dir))
        missing = [f for f in SERVER_FILES if not os.access(tls / f, os.R_OK)]
        answer["tls"] = {
            "missing": missing,
            "ca": _read(tls / "ca-cert.pem"),
            "server_cert": _read(tls / "server-cert.pem"),
        }
    answer["markers"] = {
        path: _read(Path(path)) == token for path, token in dict(request.get("markers", {})).items()
    }
    answer["ports"] = _free_ports(request.get("address"), int(request.get("ports", 0)))
    return answer


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _free_ports(address: object, count: int) -> list[int]:
    """``count`` TCP ports free on ``address`` now (bound together, so they differ)."""
    if address is None or count <= 0:
        return []
    family = socket.AF_INET6 if ":" in str(address) else socket.AF_INET
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(family, socket.SOCK_STREAM)
            socks.append(s)
            s.bind((str(address), 0))
        return [s.getsockname()[1] for s in socks]
    except OSError as err:
        raise UsageError(f"cannot listen on {address} on the target host: {err}") from err
    finally:
        for s in socks:
            s.close()


#: Seconds the relay may take to hold the monitor and listen.
_RELAY_START_S = 10.0


async def _launch(request: Mapping[str, Any]) -> dict[str, Any]:
    plan = LaunchPlan.from_json(request)
    relay_socket = plan.directory / f"{plan.qmp.stem}.relay.sock"
    target = await start_local_target(attrs.evolve(plan, files=(*plan.files, relay_socket)))
    try:
        pid = await _start_relay(target, relay_socket)
    except BaseException:
        with trio.CancelScope(shield=True):
            await target.remove()
        raise
    return {**target.to_json(), "relay": {"socket": os.fspath(relay_socket), "pid": pid}}


async def _start_relay(target: LocalTarget, relay_socket: Path) -> int:
    argv = [sys.executable, "-m", "livemig.relay", os.fspath(target.qmp), os.fspath(relay_socket)]
    with target.log.open("ab") as log:
        process = await trio.lowlevel.open_process(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,  # outlives this command, as the target does
        )
    with trio.move_on_after(_RELAY_START_S):
        while not await trio.Path(relay_socket).exists():
            if process.returncode is not None:
                break
            with trio.move_on_after(0.02):
                await process.wait()
        else:
            return process.pid
    process.kill()
    await process.wait()
    raise ProcessError(f"the monitor relay did not start (status {process.returncode})")


def _unrelay(request: Mapping[str, Any]) -> dict[str, Any]:
    pid = int(request["pid"])
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return {"stopped": False}
    if b"livemig.relay" in cmdline:  # that pid is still the relay, not a later process
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    return {"stopped": True}


async def _remove(request: Mapping[str, Any]) -> dict[str, Any]:
    await LocalTarget.from_json(request).remove()
    return {"removed": True}


def _request() -> dict[str, Any]:
    try:
        request = json.loads(sys.stdin.read())
    except ValueError as err:
        raise UsageError(f"the request is not JSON: {err}") from err
    if not isinstance(request, dict):
        raise UsageError("the request is not a JSON object")
    return request


def _answer(action: str, request: Mapping[str, Any]) -> dict[str, Any]:
    if action == "probe":
        return probe(request)
    if action == "launch":
        return trio.run(_launch, request)
    if action == "remove":
        return trio.run(_remove, request)
    if action == "unrelay":
        return _unrelay(request)
    raise UsageError(f"no action {action!r}: probe, launch, remove or unrelay")


def main(action: str) -> int:
    """Run ``action`` on the JSON request on stdin; print the answer."""
    try:
        answer = _answer(action, _request())
    except UsageError as err:
        print(json.dumps({"error": str(err), "usage": True}))
        return 2
    except (LivemigError, OSError, KeyError, TypeError, ValueError) as err:
        print(json.dumps({"error": f"{type(err).__name__}: {err}", "usage": False}))
        return 1
    print(json.dumps(answer))
    return 0
