"""Control of another host over OpenSSH: one master connection, commands and unix-socket
forwards through it.

livemig runs no network daemon of its own. Everything it says to a remote host goes through the
operator's ``ssh`` (their keys, ``known_hosts`` and config; ``BatchMode``: it never prompts):

- **one master connection** (``ControlMaster``) per run, its control socket in livemig's 0700
  work dir: every command and forward multiplexes over it, so the host is authenticated once;
- **commands**: ``livemig remote-target …`` on the remote host, JSON on stdin and stdout;
- **unix-socket forwards** (``-O forward -L LOCAL:REMOTE``): the target's QMP socket, and with
  ``--tunnel ssh`` the RAM stream's and the NBD server's, appear as sockets on this host.

A master that dies (the connection dropped, sshd restarted) is started again by
:meth:`SshConnection.keep_alive` with the same forwards, so a monitor that reconnects finds its
socket answering again.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from collections.abc import Sequence
from pathlib import Path

import attrs
import trio

from livemig.transports.children import die_with_parent_hook
from livemig.transports.errors import LivemigError, ToolError, UsageError

__all__ = ["SshConnection", "SshTarget", "parse_ssh_url"]

#: Seconds the master may take to connect and authenticate.
CONNECT_TIMEOUT = 20.0
#: Seconds between keep-alive probes of the master, and how many may go unanswered.
_ALIVE_INTERVAL, _ALIVE_COUNT = 2, 3
_HOST = re.compile(r"^(?:([A-Za-z0-9._-]+)@)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(?::(\d{1,5}))?$")


@attrs.frozen
class SshTarget:
    """Where to ssh: ``[user@]host[:port]`` and an optional client config file.

    :param config: an OpenSSH client config (``ssh -F``); ``None``: the user's own.
    """

    host: str
    user: str | None = None
    port: int | None = None
    config: Path | None = None

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host

    def __str__(self) -> str:
        port = f":{self.port}" if self.port is not None else ""
        return f"ssh://{self.destination}{port}"

    def options(self) -> list[str]:
        """The options every ``ssh`` of livemig's takes."""
        argv = ["-o", "BatchMode=yes"]
        if self.config is not None:
            argv += ["-F", os.fspath(self.config)]
        if self.port is not None:
            argv += ["-p", str(self.port)]
        return argv

    def to_json(self) -> dict[str, object]:
        return {
            "host": self.host,
            "user": self.user,
            "port": self.port,
            "config": os.fspath(self.config) if self.config is not None else None,
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> SshTarget:
        config = data.get("config")
        port = data.get("port")
        user = data.get("user")
        return cls(
            host=str(data["host"]),
            user=str(user) if user is not None else None,
            port=int(str(port)) if port is not None else None,
            config=Path(str(config)) if config is not None else None,
        )


def parse_ssh_url(text: str, *, config: Path | None = None) -> SshTarget:
    """Read ``ssh://[user@]host[:port]``.

    :raise UsageError: when it is not one.
    """
    rest = text.removeprefix("ssh://")
    match = _HOST.match(rest) if rest != text else None
    if match is None:
        raise UsageError(f"bad target {text!r}: expected ssh://[user@]host[:port]")
    user, host, port = match.groups()
    if port is not None and not 1 <= int(port) <= 65535:
        raise UsageError(f"bad port in {text!r}")
    return SshTarget(
        host=host.removeprefix("[").removesuffix("]"),
        user=user,
        port=int(port) if port is not None else None,
        config=config,
    )


@attrs.define(eq=False)
class SshConnection:
    """One ``ControlMaster`` to ``target``, its control socket at ``control``."""

    target: SshTarget
    control: Path
    #: Forwards to keep: local socket → remote socket.
    forwards: dict[Path, Path] = attrs.Factory(dict)
    _master: trio.Process | None = None
    _restarts: int = 0
    _started: bool = False
    _down_since: float | None = None
    _changed: trio.Event = attrs.Factory(trio.Event)

    def _argv(self, *extra: str) -> list[str]:
        return ["ssh", *self.target.options(), "-S", os.fspath(self.control), *extra]

    async def start(self) -> None:
        """Connect (the master), bounded by :data:`CONNECT_TIMEOUT`.

        :raise UsageError: when the host cannot be reached or refuses us (nothing was started).
        """
        argv = self._argv(
            "-M",
            "-N",
            "-o",
            "ControlPersist=no",
            "-o",
            f"ConnectTimeout={int(CONNECT_TIMEOUT)}",
            "-o",
            f"ServerAliveInterval={_ALIVE_INTERVAL}",
            "-o",
            f"ServerAliveCountMax={_ALIVE_COUNT}",
            "-o",
            "ExitOnForwardFailure=yes",
            "-o",
            "StreamLocalBindUnlink=yes",
            "-o",
            "StreamLocalBindMask=0177",
            self.target.destination,
        )
        self.control.unlink(missing_ok=True)
        try:
            master = await trio.lowlevel.open_process(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                # Gone with livemig, even killed: ``recover`` makes its own.
                preexec_fn=die_with_parent_hook(),
            )
        except OSError as err:
            raise UsageError(f"cannot run ssh: {err}") from err
        with trio.move_on_after(CONNECT_TIMEOUT):
            while master.returncode is None:
                if await self._check():
                    if self._started:
                        self._restarts += 1
                    self._master, self._started = master, True
                    return
                with trio.move_on_after(0.05):
                    await master.wait()
        error = await _drain(master)
        raise UsageError(f"cannot reach {self.target} over ssh: {error or 'timed out'}")

    async def _check(self) -> bool:
        result = await trio.run_process(
            self._argv("-O", "check", self.target.destination),
            check=False,
            capture_stdout=True,
            capture_stderr=True,
        )
        return result.returncode == 0

    @property
    def alive(self) -> bool:
        return self._master is not None and self._master.returncode is None

    async def run(self, argv: Sequence[str], *, stdin: bytes = b"") -> tuple[int, bytes, str]:
        """Run ``argv`` on the remote host (through the master), ``stdin`` fed to it; its exit
        status, stdout and stderr (255: ssh itself failed). No deadline: the caller's."""
        command = shlex.join(argv)
        full = self._argv("-o", "ControlMaster=no", self.target.destination, "--", command)
        result = await trio.run_process(
            full, stdin=stdin, capture_stdout=True, capture_stderr=True, check=False
        )
        return result.returncode, result.stdout, result.stderr.decode(errors="replace")

    async def resolved_host(self) -> str:
        """The address ``ssh`` connects to for the target (``HostName`` of its config)."""
        argv = ["ssh", *self.target.options(), "-G", self.target.destination]
        result = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
        for line in result.stdout.decode(errors="replace").splitlines():
            key, _, value = line.partition(" ")
            if key == "hostname" and value:
                return value
        return self.target.host

    async def forward(self, local: Path, remote: Path) -> None:
        """Make ``local`` (a unix socket on this host, 0600) reach ``remote`` on the other.

        :raise ToolError: when ssh refuses it.
        """
        self.forwards[local] = remote
        await self._forward(local, remote)

    async def _forward(self, local: Path, remote: Path) -> None:
        argv = self._argv("-O", "forward", "-L", f"{local}:{remote}", self.target.destination)
        result = await trio.run_process(argv, check=False, capture_stdout=True, capture_stderr=True)
        if result.returncode != 0:
            raise ToolError(argv, result.returncode, result.stderr.decode(errors="replace"))

    async def keep_alive(self, *, pause: float = 1.0) -> None:
        """Run until cancelled: whenever the master exits, start it again and re-make the
        forwards, ``pause`` seconds between tries; :meth:`down_for` tells how long it has been
        down."""
        while True:
            master = self._master
            if master is not None:
                await master.wait()
            if self._down_since is None:
                self._down_since = trio.current_time()
                self._changed.set()
            while True:
                try:
                    await self.start()
                    for local, remote in self.forwards.items():
                        await self._forward(local, remote)
                except LivemigError:
                    await trio.sleep(pause)
                    continue
                break
            self._down_since = None

    async def down_for(self, seconds: float) -> None:
        """Return once the connection has been down ``seconds`` on end (while
        :meth:`keep_alive` runs)."""
        while True:
            if self._down_since is None:
                self._changed = trio.Event()
                await self._changed.wait()
                continue
            left = self._down_since + seconds - trio.current_time()
            if left <= 0:
                return
            await trio.sleep(min(left, 0.5))

    @property
    def restarts(self) -> int:
        """How many times the master was started again after it died."""
        return self._restarts

    async def close(self) -> None:
        """Stop the master (its forwards go with it) and remove their local sockets."""
        master, self._master = self._master, None
        if master is not None and master.returncode is None:
            await trio.run_process(
                self._argv("-O", "exit", self.target.destination),
                check=False,
                capture_stdout=True,
                capture_stderr=True,
            )
            with trio.move_on_after(5):
                await master.wait()
            if master.returncode is None:
                master.kill()
                await master.wait()
        for local in self.forwards:
            local.unlink(missing_ok=True)
        self.control.unlink(missing_ok=True)


async def _drain(process: trio.Process) -> str:
    if process.returncode is None:
        process.kill()
    await process.wait()
    if process.stderr is None:  # pragma: no cover - a pipe
        return ""
    data = b""
    with trio.move_on_after(1):
        while chunk := await process.stderr.receive_some():
            data += chunk
    await process.stderr.aclose()
    return data.decode(errors="replace").strip()
