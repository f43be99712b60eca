from __future__ import annotations

from pathlib import Path

import attrs
import pytest

from livemig.fsm.machine import StorageChoice, TransferChoice
from livemig.fsm.plan import Deadlines, Plan, Policy
from livemig.transports.endpoints import TcpEndpoint, UnixEndpoint, parse_endpoint
from livemig.transports.errors import UsageError


def make(**overrides: object) -> Plan:
    kwargs: dict[str, object] = {
        "source_qmp": "/run/a.qmp",
        "target_qmp": "/run/b.qmp",
        "storage": "non-shared",
        "work_dir": "/var/tmp/w",
        "run_id": "abc123",
    }
    kwargs.update(overrides)
    return Plan.create(**kwargs)  # type: ignore[arg-type]


def test_defaults_put_sockets_in_work_dir() -> None:
    plan = make()
    assert plan.storage is StorageChoice.NON_SHARED
    assert plan.migrate_uri == UnixEndpoint(Path("/var/tmp/w/lm-abc123-ram.sock"))
    assert plan.nbd == UnixEndpoint(Path("/var/tmp/w/lm-abc123-nbd.sock"))
    assert plan.overlay_path == Path("/var/tmp/w/lm-abc123-d0-overlay.qcow2")
    assert plan.names(1).overlay_path == Path("/var/tmp/w/lm-abc123-d1-overlay.qcow2")


def test_names_are_unique_per_run() -> None:
    a, b = make(run_id=None), make(run_id=None)
    assert a.run_id != b.run_id
    for name in ("overlay_node", "nbd_node", "mirror_job", "commit_job", "export_id"):
        assert getattr(a, name) != getattr(b, name)
        assert a.run_id in getattr(a, name)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"storage": "ceph"}, "storage must be one of"),
        ({"run_id": "UPPER"}, "run id"),
        ({"disks": ["bad name"]}, "bad block node name"),
        ({"disks": ["root", "root"]}, "disk 'root' is named twice"),
        ({"source_qmp": "tcp:host:4444"}, "must be a unix socket"),
        ({"migrate_uri": "tcp:host:notaport"}, "bad tcp endpoint"),
        ({"migrate_uri": "tcp:192.0.2.7:4444"}, "in the clear off this host"),
        ({"migrate_uri": "tcp:peer.example:4444"}, "in the clear off this host"),
        ({"nbd": "tcp:[2001:db8::1]:10809"}, "disk copy over"),
    ],
)
def test_bad_input_is_a_usage_error(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        make(**overrides)


@pytest.mark.parametrize(
    "uri", ["tcp:127.0.0.1:4444", "tcp:127.1.2.3:4444", "tcp:[::1]:4444", "tcp:localhost:1"]
)
def test_plain_tcp_on_loopback_needs_no_insecure(uri: str) -> None:
    assert isinstance(make(migrate_uri=uri).migrate_uri, TcpEndpoint)


def test_plain_tcp_off_host_is_allowed_when_asked() -> None:
    plan = make(migrate_uri="tcp:192.0.2.7:4444", insecure=True)
    assert plan.migrate_uri == TcpEndpoint("192.0.2.7", 4444)


def test_policy_and_deadlines_validate() -> None:
    with pytest.raises(UsageError):
        Deadlines(switchover=0)
    with pytest.raises(UsageError, match="downtime_limit_ms"):
        Policy(downtime_limit_ms=0)
    assert attrs.evolve(Policy(), max_bandwidth=10).max_bandwidth == 10


def test_plan_is_frozen() -> None:
    plan = make()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        plan.run_id = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("unix:/a/b.sock", UnixEndpoint(Path("/a/b.sock"))),
        ("/a/b.sock", UnixEndpoint(Path("/a/b.sock"))),
        ("tcp:127.0.0.1:4444", TcpEndpoint("127.0.0.1", 4444)),
        ("tcp:[::1]:4444", TcpEndpoint("::1", 4444)),
    ],
)
def test_parse_endpoint(text: str, expected: object) -> None:
    assert parse_endpoint(text) == expected


def test_endpoint_spellings() -> None:
    unix = UnixEndpoint(Path("/s"))
    assert unix.uri == "unix:/s"
    assert unix.flat_address() == {"type": "unix", "path": "/s"}
    tcp = TcpEndpoint("::1", 5)
    assert tcp.uri == "tcp:[::1]:5"
    assert tcp.flat_address() == {"type": "inet", "host": "::1", "port": "5"}


@pytest.mark.parametrize(
    "text", ["tcp:", "tcp:host", "tcp:h:0", "tcp:h:70000", "unix:", "tcp:[zz]:1"]
)
def test_bad_endpoints(text: str) -> None:
    with pytest.raises(UsageError):
        parse_endpoint(text)


def test_the_transfer_defaults_to_auto_and_a_bad_one_is_refused() -> None:
    plan = Plan.create(source_qmp="/s.qmp", target_qmp="/t.qmp", storage="shared", work_dir="/w")
    assert plan.transfer is TransferChoice.AUTO
    assert plan.state_file == Path(f"/w/lm-{plan.run_id}-state")
    with pytest.raises(UsageError, match="mode must be one of live, stateful-stop, auto, not 'x'"):
        Plan.create(
            source_qmp="/s.qmp", target_qmp="/t.qmp", storage="shared", work_dir="/w", transfer="x"
        )
