"""livemig.drivers.qmp against the fake QMP server: every fault it can script, on trio's mock
clock."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qemu.qmp.message import DeserializationError
from support.fake_qmp import (
    Delayed,
    Disconnect,
    ErrorReply,
    FakeQMPServer,
    Hang,
    Malformed,
    RawReply,
    Stage,
    fake_qmp_server,
    replies,
)
from support.qmp_fixtures import aio_loop_fixture  # noqa: F401  (provides "aio_loop")

from livemig.drivers import qmp
from livemig.drivers.qmp import QMPEvent, connect, open_monitor
from livemig.transports.errors import (
    CommandFailed,
    ConnectFailed,
    ConnectionLost,
    MonitorClosed,
    ProtocolError,
    QMPError,
)

# Every test names aio_loop (the driver needs it) and autojump_clock (deterministic time: the fake
# server runs in this process, so the clock only jumps when every task really waits).
RUNNING = {"status": "running", "running": True}
# Generous on the mock clock: a deadline here only fires when something hangs.
GUARD = 60


def ok(**table: object) -> dict[str, object]:
    """A reply table with QMP's dashed names written as underscores."""
    return {name.replace("_", "-"): value for name, value in table.items()}


async def test_reply_is_returned_and_command_recorded(
    aio_loop: object, autojump_clock: object, tmp_path: Path
) -> None:
    with trio.fail_after(GUARD):
        async with (
            fake_qmp_server(tmp_path, replies(ok(query_status=RUNNING))) as server,
            open_monitor(server.path, name="src") as monitor,
        ):
            assert await monitor.execute("query-status") == RUNNING
            assert monitor.name == "src"
    assert [c.command for c in server.commands] == ["qmp_capabilities", "query-status"]
    assert server.commands[0].arguments == {"enable": ["oob"]}


async def test_error_reply_raises_command_failed(
    aio_loop: object, autojump_clock: object, tmp_path: Path
) -> None:
    handler = replies({"blockdev-del": ErrorReply("DeviceNotFound", "no node 'x'")})
    with trio.fail_after(GUARD):
        async with (
            fake_qmp_server(tmp_path, handler) as server,
            open_monitor(server.path, name="src") as monitor,
        ):
            with pytest.raises(CommandFailed) as caught:
                await monitor.execute("blockdev-del", {"node-name": "x"})
            # The connection is fine after an error reply.
            with pytest.raises(CommandFailed, match="CommandNotFound"):
                await monitor.execute("no-such-command")
    err = caught.value
    assert (err.monitor, err.command, err.arguments) == ("src", "blockdev-del", {"node-name": "x"})
    assert (err.error_class, err.desc) == ("DeviceNotFound", "no node 'x'")
    assert str(err) == "src: blockdev-del failed: DeviceNotFound: no node 'x'"


async def test_hang_leaves_the_deadline_to_the_caller_and_closes(
    aio_loop: object, autojump_clock: object, tmp_path: Path
) -> None:
    with trio.fail_after(GUARD):
        async with fake_qmp_server(tmp_path, replies({"stop": Hang()})) as server:
            monitor = await connect(server.path, name="src")
            with trio.move_on_after(5) as scope:
                await monitor.execute("stop")
            assert scope.cancelled_caught
            await monitor.aclose()
            await server.wait_sessions_ended()
            with pytest.raises(MonitorClosed):
                await monitor.execute("query-status")


async def test_cancelled_command_still_reached_qemu_and_connection_goes_on(
    aio_loop: object, autojump_clock: object, tmp_path: Path
) -> None:
    handler = replies({"stop": Delayed(10, {}), "query-status": RUNNING})
    with trio.fail_after(GUARD):
        async with (
            fake_qmp_server(tmp_path, handler) as server,
            open_monitor(server.path, name="src") as monitor,
        ):
            with trio.move_on_after(1):
                await monitor.execute("stop")
            assert server.commands[-1].command == "stop"
            # The late reply to "stop" is dropped; the next command gets its own reply.
            assert await monitor.execute("query-status") == RUNNING


async def test_delayed_reply_arrives(
    aio_loop: object, autojump_clock: object, tmp_path: Path
) -> None:
    with trio.fail_after(GUARD):
        async with (
            fake_qmp_server(tmp_path, replies({"cont": Delayed(3, {})})) as server,
            open_monitor(server.path, name="src") as monitor,
        ):
            start = trio.current_time()
            assert await monitor.execute("cont") == {}
            assert trio.current_time() - start >= 3


@pytest.mark.parametrize(
    ("stage", "seen"),
    [
        (Stage.BEFORE_READ, ConnectionResetError),  # closed with the command unread
        (Stage.AFTER_READ, EOFError),
        (Stage.MID_REPLY, DeserializationError),  # a reply cut short
    ],
)
async def test_disconnect_mid_command_raises_connection_lost(
    aio_loop: object, autojump_clock: object, tmp_path: Path, stage: Stage, seen: type[Exception]
) -> None:
    handler = replies({"query-status": Disconnect(stage)})
    with trio.fail_after(GUARD):
        async with (
            fake_qmp_server(tmp_path, handler) as server,
            open_monitor(server.path, name="src") as monitor,
        ):
            with pytest.raises(ConnectionLost) as caught:
                await monitor.execute("query-status")
            assert isinstance(caught.value.__cause__, seen)
            # Every later use says the same, at once.
            with pytest.raises(ConnectionLost):
                await monitor.execute("query-status")


async def test_server_hang_up_while_idle_then_command(
    aio_loop: object, autojump_clock: object, tmp_path: Path
) -> None:
    with trio.fail_after(GUARD):
        async with (
            fake_qmp_server(tmp_path, replies({})) as server,
            open_monitor(server.path, name="src") as monitor,
        ):
            server.hang_up()
            await server.wait_sessions_ended()
            with pytest.raises(ConnectionLost):
                await monitor.execute("query-status")


async def test_malformed_reply_raises_protocol_error_then_connection_is_lost(
    aio_loop: object,
    autojump_clock: object,
    tmp_path: Path,
) -> None:
    with trio.fail_after(GUARD):
        async with (
            fake_qmp_server(tmp_path, replies({"query-status": Malformed()})) as server,
            open_monitor(server.path, name="src") as monitor,
        ):
            with pytest.raises(ProtocolError, match="not QMP"):
                await monitor.execute("query-status")
            with pytest.raises(ConnectionLost):
                await monitor.execute("query-status")


@pytest.mark.parametrize(
    "reply",
    [
        RawReply({"unexpected": 1}),
        RawReply({"error": {"desc": "no class"}}),
    ],
)
async def test_reply_of_wrong_shape_raises_protocol_error_and_connection_survives(
    aio_loop: object, autojump_clock: object, tmp_path: Path, reply: RawReply
) -> None:
    handler = replies({"query-status": reply, "cont": {}})
    with trio.fail_after(GUARD):
        async with (
            fake_qmp_server(tmp_path, handler) as server,
            open_monitor(server.path, name="src") as monitor,
        ):
            with pytest.raises(ProtocolError):
                await monitor.execute("query-status")
            assert await monitor.execute("cont") == {}


async def test_concurrent_commands_get_their_own_replies(
    aio_loop: object, autojump_clock: object, tmp_path: Path
) -> None:
    async def handler(command: str, arguments: Mapping[str, Any]) -> object:
        return {"echo": arguments["n"]}

    results: dict[int, object] = {}
    with trio.fail_after(GUARD):
        async with (
            fake_qmp_server(tmp_path, handler) as server,
            open_monitor(server.path, name="src") as monitor,
        ):

            async def one(n: int) -> None:
                results[n] = await monitor.execute("echo", {"n": n})

            async with trio.open_nursery() as nursery:
                for n in range(10):
                    nursery.start_soon(one, n)
    assert results == {n: {"echo": n} for n in range(10)}


async def test_arguments_with_brackets_and_quotes_in_strings_arrive_whole(
    aio_loop: object, autojump_clock: object, tmp_path: Path
) -> None:
    tricky = {"path": 'a } ] { [ " \\ \n z', "list": [{"x": "}"}, "]"]}

    async def handler(command: str, arguments: Mapping[str, Any]) -> object:
        return dict(arguments)

    with trio.fail_after(GUARD):
        async with (
            fake_qmp_server(tmp_path, handler) as server,
            open_monitor(server.path, name="src") as monitor,
        ):
            assert await monitor.execute("echo", tricky) == tricky
            assert await monitor.execute("echo", {"n": 2}) == {"n": 2}


# ---- events -----------------------------------------------------------------------------------


async def test_events_arrive_in_order_including_those_before_receive(
    aio_loop: object, autojump_clock: object, tmp_path: Path
) -> None:
    with trio.fail_after(GUARD):
        async with (
            fake_qmp_server(tmp_path, replies({"query-status": RUNNING})) as server,
            open_monitor(server.path, name="src") as monitor,
            monitor.listen() as events,
        ):
            await server.emit("STOP", timestamp=1700000000.25)
            await server.emit("MIGRATION", {"status": "setup"})
            await server.emit("RESUME")
            # A command round trip: the events before its reply have surely been read.
            await monitor.execute("query-status")
            received = [await events.receive() for _ in range(3)]
    assert [e.name for e in received] == ["STOP", "MIGRATION", "RESUME"]
    assert received[0] == QMPEvent("STOP", {}, 1700000000.25)
    assert received[1].data == {"status": "setup"}


async def test_listen_filters_by_name_and_iterates(
    aio_loop: object, autojump_clock: object, tmp_path: Path
) -> None:
    with trio.fail_after(GUARD):
        async with (
            fake_qmp_server(tmp_path, replies({})) as server,
            open_monitor(server.path, name="src") as monitor,
            monitor.listen("MIGRATION") as migration,
            monitor.listen("STOP", "RESUME") as runstate,
        ):
            await server.emit("STOP")
            await server.emit("MIGRATION", {"status": "active"})
            await server.emit("RESUME")
            await server.emit("MIGRATION", {"status": "completed"})
            statuses = []
            async for event in migration:
                statuses.append(event.data["status"])
                if event.data["status"] == "completed":
                    break
            names = [(await runstate.receive()).name for _ in range(2)]
    assert statuses == ["active", "completed"]
    assert names == ["STOP", "RESUME"]


async def test_event_handler_can_emit_before_replying(
    aio_loop: object, autojump_clock: object, tmp_path: Path
) -> None:
    server: FakeQMPServer

    async def handler(command: str, arguments: Mapping[str, Any]) -> object:
        await server.emit("STOP")
        return {}

    with trio.fail_after(GUARD):
        async with (
            fake_qmp_server(tmp_path, handler) as server,
            open_monitor(server.path, name="src") as monitor,
            monitor.listen("STOP") as events,
        ):
            await monitor.execute("stop")
            assert (await events.receive()).name == "STOP"


async def test_listener_ends_with_connection_lost_after_buffered_events(
    aio_loop: object, autojump_clock: object, tmp_path: Path
) -> None:
    with trio.fail_after(GUARD):
        async with (
            fake_qmp_server(tmp_path, replies({})) as server,
            open_monitor(server.path, name="src") as monitor,
            monitor.listen() as events,
        ):
            await server.emit("STOP")
            server.hang_up()
            assert (await events.receive()).name == "STOP"
            with pytest.raises(ConnectionLost):
                await events.receive()
            with pytest.raises(ConnectionLost):
                await events.receive()


async def test_waiting_listener_wakes_with_connection_lost(
    aio_loop: object, autojump_clock: object, tmp_path: Path
) -> None:
    with trio.fail_after(GUARD):
        async with (
            fake_qmp_server(tmp_path, replies({})) as server,
            open_monitor(server.path, name="src") as monitor,
            monitor.listen("SHUTDOWN") as events,
        ):

            async def hang_up_later() -> None:
                await trio.sleep(1)
                server.hang_up()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(hang_up_later)
                with pytest.raises(ConnectionLost):
                    await events.receive()


async def test_waiting_listener_wakes_with_monitor_closed(
    aio_loop: object, autojump_clock: object, tmp_path: Path
) -> None:
    with trio.fail_after(GUARD):
        async with fake_qmp_server(tmp_path, replies({})) as server:
            monitor = await connect(server.path, name="src")
            async with monitor.listen() as events:

                async def close_later() -> None:
                    await trio.sleep(1)
                    await monitor.aclose()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(close_later)
                    with pytest.raises(MonitorClosed):
                        await events.receive()
            with pytest.raises(MonitorClosed):
                await events.receive()
            with pytest.raises(MonitorClosed):
                async with monitor.listen():
                    pass


async def test_overflowing_listener_fails_instead_of_dropping_silently(
    aio_loop: object, autojump_clock: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(qmp, "EVENT_BUFFER_LIMIT", 2)
    with trio.fail_after(GUARD):
        async with (
            fake_qmp_server(tmp_path, replies({"query-status": RUNNING})) as server,
            open_monitor(server.path, name="src") as monitor,
            monitor.listen() as events,
        ):
            for n in range(3):
                await server.emit("MIGRATION_PASS", {"pass": n})
            await monitor.execute("query-status")
            assert [(await events.receive()).data["pass"] for _ in range(2)] == [0, 1]
            with pytest.raises(QMPError, match="left unread"):
                await events.receive()


async def test_events_and_commands_are_logged(
    aio_loop: object, autojump_clock: object, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="livemig.qmp")
    with trio.fail_after(GUARD):
        async with (
            fake_qmp_server(tmp_path, replies({"query-status": RUNNING})) as server,
            open_monitor(server.path, name="src") as monitor,
        ):
            await server.emit("STOP")
            await monitor.execute("query-status")
    logged = [r.getMessage() for r in caplog.records if r.name == "livemig.qmp"]
    assert "src: -> query-status {}" in logged
    assert "src: event STOP {}" in logged
    assert any(m.startswith("src: <- query-status") for m in logged)


# ---- life cycle -------------------------------------------------------------------------------


async def test_use_after_close_raises_monitor_closed(
    aio_loop: object, autojump_clock: object, tmp_path: Path
) -> None:
    with trio.fail_after(GUARD):
        async with fake_qmp_server(tmp_path, replies({})) as server:
            async with open_monitor(server.path, name="src") as monitor:
                pass
            await server.wait_sessions_ended()
            with pytest.raises(MonitorClosed):
                await monitor.execute("query-status")
            await monitor.aclose()  # idempotent


async def test_close_interrupts_a_pending_command_with_monitor_closed(
    aio_loop: object, autojump_clock: object, tmp_path: Path
) -> None:
    with trio.fail_after(GUARD):
        async with fake_qmp_server(tmp_path, replies({"stop": Hang()})) as server:
            monitor = await connect(server.path, name="src")

            async def close_later() -> None:
                await trio.sleep(1)
                await monitor.aclose()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(close_later)
                with pytest.raises(MonitorClosed):
                    await monitor.execute("stop")


async def test_open_monitor_closes_when_the_body_fails(
    aio_loop: object, autojump_clock: object, tmp_path: Path
) -> None:
    with trio.fail_after(GUARD):
        async with fake_qmp_server(tmp_path, replies({})) as server:
            with pytest.raises(KeyError):
                async with open_monitor(server.path, name="src"):
                    raise KeyError("boom")
            await server.wait_sessions_ended()


async def test_connect_to_missing_socket_raises_connect_failed(
    aio_loop: object, autojump_clock: object, tmp_path: Path
) -> None:
    with trio.fail_after(GUARD), pytest.raises(ConnectFailed, match="No such file") as caught:
        await connect(tmp_path / "nothing.sock", name="tgt")
    assert caught.value.monitor == "tgt"


async def test_connect_refused_raises_connect_failed(
    aio_loop: object, autojump_clock: object, tmp_path: Path
) -> None:
    path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(os.fspath(path))  # bound, never listening: a stale socket file
        with trio.fail_after(GUARD), pytest.raises(ConnectFailed, match="refused"):
            await connect(path, name="tgt")


@pytest.mark.parametrize("greeting", [b"not json", b'{"hello": 1}', b"[1]"])
async def test_bad_greeting_raises_connect_failed(
    aio_loop: object, autojump_clock: object, tmp_path: Path, greeting: bytes
) -> None:
    with trio.fail_after(GUARD):
        async with fake_qmp_server(tmp_path, replies({}), greeting=greeting) as server:
            with pytest.raises(ConnectFailed):
                await connect(server.path, name="tgt")
            await server.wait_sessions_ended()


async def test_cancelled_connect_leaves_nothing_open(
    aio_loop: object, autojump_clock: object, tmp_path: Path
) -> None:
    with trio.fail_after(GUARD):
        async with fake_qmp_server(tmp_path, replies({}), greeting=None) as server:
            with trio.move_on_after(5) as scope:
                await connect(server.path, name="tgt")
            assert scope.cancelled_caught
            # The server sees the client hang up: no half-open connection is left behind.
            await server.wait_sessions_ended()


async def test_without_trio_asyncio_loop_the_message_says_what_to_do(tmp_path: Path) -> None:
    token = trio_asyncio.current_loop.set(None)  # as if no loop had been opened
    try:
        with pytest.raises(RuntimeError, match=r"trio_asyncio\.open_loop"):
            await connect(tmp_path / "x.sock", name="src")
    finally:
        trio_asyncio.current_loop.reset(token)


# ---- property: whatever the server does, execute answers (never hangs) with the right kind ----

_FATAL = st.sampled_from([Disconnect(stage) for stage in Stage] + [Malformed()])
_ANSWERS = st.one_of(
    st.fixed_dictionaries({"n": st.integers()}),
    st.builds(ErrorReply, st.sampled_from(["GenericError", "DeviceNotFound"]), st.text()),
    st.builds(RawReply, st.just({"unexpected": True})),
    st.builds(Delayed, st.floats(0, 5), st.just({"late": True})),
    _FATAL,
)


def _expected(answer: object) -> type[BaseException] | None:
    if isinstance(answer, Delayed):
        return _expected(answer.reply)
    if isinstance(answer, ErrorReply):
        return CommandFailed
    if isinstance(answer, RawReply):
        return ProtocolError
    if isinstance(answer, Malformed):
        return ProtocolError
    if isinstance(answer, Disconnect):
        return ConnectionLost
    return None


# pytest-trio sets up trio fixtures (the loop, the clock) afresh for every example.
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=50)
@given(answers=st.lists(_ANSWERS, min_size=1, max_size=6))
async def test_every_answer_maps_to_one_outcome(
    aio_loop: object, autojump_clock: object, tmp_path: Path, answers: list[object]
) -> None:
    script = iter(answers)

    async def handler(command: str, arguments: Mapping[str, Any]) -> object:
        return next(script)

    with trio.fail_after(GUARD):
        async with (
            fake_qmp_server(tmp_path, handler) as server,
            open_monitor(server.path, name="src") as monitor,
        ):
            for answer in answers:
                expected = _expected(answer)
                if expected is None:
                    assert await monitor.execute("x") == getattr(answer, "reply", answer)
                    continue
                with pytest.raises(expected):
                    await monitor.execute("x")
                if isinstance(answer, Disconnect | Malformed):
                    with pytest.raises(ConnectionLost):
                        await monitor.execute("x")
                    break
