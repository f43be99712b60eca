"""Across hosts, without QEMU: the TLS and tunnel paths of the scripts, the plan's endpoints,
``ssh://`` targets, the launch's JSON forms and the command line's refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import pytest
from test_script import answers, context, drive, words

from livemig.cli import main
from livemig.drivers.image import _nbd_target
from livemig.drivers.launch import DiskImage, LaunchPlan, LocalTarget
from livemig.fsm import script
from livemig.fsm.effects import Call, Gather, OnHost, PushUndo
from livemig.fsm.machine import State
from livemig.fsm.plan import Plan
from livemig.fsm.undo import Side, UndoKind
from livemig.transports.endpoints import TcpEndpoint, Tls, UnixEndpoint
from livemig.transports.errors import UsageError
from livemig.transports.ssh import SshTarget, parse_ssh_url

TLS = Tls(Path("/pki"), "host-b")


def tls_context(state: State, **plan_changes: Any) -> script.Context:
    ctx = context(state=state)
    ctx.plan = attrs.evolve(
        ctx.plan,
        tls=TLS,
        migrate_uri=TcpEndpoint("10.0.0.2", 4001),
        nbd=TcpEndpoint("10.0.0.2", 4002),
        **plan_changes,
    )
    return ctx


def test_tls_adds_an_object_on_each_side_and_names_it_in_the_parameters() -> None:
    ctx = tls_context(State.CONNECTED)
    caps = {"events": False, "pause-before-switchover": False}
    ctx.offered = {Side.SOURCE: caps, Side.TARGET: caps}
    effects = drive(
        script.set_capabilities(ctx),
        answers({"query_parameters": {"downtime-limit": 300, "tls-creds": ""}}),
    )
    assert words(effects) == [
        "gather:source:query_parameters,target:query_parameters",
        "push:delete-object/source",  # before the object exists
        "gather:target:add_tls_creds,source:add_tls_creds",
        "push:restore-capabilities/source,restore-parameters/source",
        "gather:target:set_capabilities,target:set_parameters,source:set_capabilities,"
        "source:set_parameters",
        "observe:CapabilitiesSet",
    ]
    adds = effects[2]
    assert isinstance(adds, Gather)
    assert [c.kwargs["endpoint"] for c in adds.calls] == ["server", "client"]
    restore = effects[3]
    assert isinstance(restore, PushUndo)
    # The source's TLS parameters go back to what they were: no run's object stays named.
    assert restore.steps[1].args["parameters"] == {
        "downtime-limit": 300,
        "tls-creds": "",
        "tls-hostname": "",
    }
    sets = effects[4]
    assert isinstance(sets, Gather)
    target_params, source_params = sets.calls[1].args[0], sets.calls[3].args[0]
    assert target_params["tls-creds"] == "lm-r1-tls"
    assert source_params["tls-creds"] == "lm-r1-tls"
    assert source_params["tls-hostname"] == "host-b"


def test_tls_mirror_serves_and_dials_nbd_over_tcp_with_the_creds() -> None:
    ctx = tls_context(State.SNAPSHOTTED)
    effects = drive(script.mirror(ctx), answers())
    push = effects[0]
    assert isinstance(push, PushUndo)
    assert UndoKind.DELETE_FILE not in {s.kind for s in push.steps}  # no socket file
    start = effects[1]
    assert isinstance(start, Call)
    assert start.args == (TcpEndpoint("10.0.0.2", 4002),)
    assert start.kwargs["tls_creds"] == "lm-r1-tls"
    copy = next(e for e in effects if isinstance(e, OnHost))
    assert copy.args[2] == TcpEndpoint("10.0.0.2", 4002)
    assert copy.kwargs["tls"] == TLS
    client = next(e for e in effects if isinstance(e, Call) and e.name == "blockdev_add")
    assert client.args[0]["server"] == {"type": "inet", "host": "10.0.0.2", "port": "4002"}
    assert client.args[0]["tls-creds"] == "lm-r1-tls"
    assert client.args[0]["tls-hostname"] == "host-b"


def test_a_tunnel_listens_on_the_remote_socket_and_dials_the_local_one() -> None:
    ctx = context(state=State.MIRRORING)
    ctx.plan = attrs.evolve(
        ctx.plan,
        migrate_uri=UnixEndpoint("/here/ram.sock"),
        migrate_listen=UnixEndpoint("/there/ram.sock"),
        remote={"ssh": {"host": "b"}},
    )
    effects = drive(script.transfer_state(ctx), answers())
    calls = [e for e in effects if isinstance(e, Call)]
    assert [(c.side, c.args) for c in calls] == [
        (Side.TARGET, ("unix:/there/ram.sock",)),
        (Side.SOURCE, ("unix:/here/ram.sock",)),
    ]
    push = next(e for e in effects if isinstance(e, PushUndo))
    # The remote socket is the remote host's: its launch removes it, not this host.
    assert [s.kind for s in push.steps] == [UndoKind.CANCEL_MIGRATION]
    assert Path("/there/ram.sock") not in ctx.run_files()
    assert Path("/here/ram.sock") in ctx.run_files()


def test_the_base_copy_dials_tls_nbd_in_qemu_imgs_own_words() -> None:
    opts = _nbd_target(TcpEndpoint("10.0.0.2", 4002), "lm-x", TLS)
    assert opts == (
        "driver=nbd,server.type=inet,server.host=10.0.0.2,server.port=4002,export=lm-x,"
        "tls-creds=lm-tls,tls-hostname=host-b"
    )
    assert "tls" not in _nbd_target(UnixEndpoint("/a,b.sock"), "e", None)
    assert "server.path=/a,,b.sock" in _nbd_target(UnixEndpoint("/a,b.sock"), "e", None)


def test_plain_tcp_off_the_host_is_refused_unless_tls_or_insecure() -> None:
    common: dict[str, Any] = {
        "source_qmp": "/s",
        "target_qmp": "/t",
        "storage": "shared",
        "work_dir": "/w",
        "migrate_uri": "tcp:192.0.2.7:4000",
    }
    with pytest.raises(UsageError, match="in the clear"):
        Plan.create(**common)
    assert Plan.create(**common, insecure=True).migrate_uri == TcpEndpoint("192.0.2.7", 4000)
    assert Plan.create(**common, tls=TLS).tls == TLS
    assert Plan.create(**{**common, "migrate_uri": "tcp:127.0.0.1:4000"}).tls is None


@pytest.mark.parametrize(
    ("text", "target"),
    [
        ("ssh://host-b", SshTarget("host-b")),
        ("ssh://root@10.1.2.3:2222", SshTarget("10.1.2.3", user="root", port=2222)),
        ("ssh://[fe80::1]", SshTarget("fe80::1")),
    ],
)
def test_ssh_urls(text: str, target: SshTarget) -> None:
    assert parse_ssh_url(text) == target
    assert SshTarget.from_json(target.to_json()) == target


@pytest.mark.parametrize("text", ["host-b", "ssh://", "ssh://a b", "ssh://h:99999", "ssh://@h"])
def test_bad_ssh_urls(text: str) -> None:
    with pytest.raises(UsageError):
        parse_ssh_url(text)


def test_a_launch_and_its_target_travel_as_json() -> None:
    plan = LaunchPlan(
        argv=("qemu-system-x86_64", "-S"),
        cwd=None,
        directory=Path("/t"),
        qmp=Path("/t/q.sock"),
        log=Path("/t/qemu.log"),
        serial=Path("/t/qemu.log"),
        disks={"root.qcow2": Path("/t/root.qcow2")},
        images={Path("/t/root.qcow2"): DiskImage(format="qcow2", virtual_size=1 << 30)},
        files=(Path("/t/q.sock"),),
    )
    assert LaunchPlan.from_json(plan.to_json()) == plan
    target = LocalTarget(
        qmp=Path("/t/q.sock"),
        pid=42,
        serial=None,
        log=Path("/t/qemu.log"),
        disks={"root.qcow2": Path("/t/root.qcow2")},
        argv=("qemu",),
        directory=Path("/t"),
        created_dir=True,
        files=(Path("/t/qemu.log"),),
        start_time=7,
    )
    assert LocalTarget.from_json(target.to_json()) == target
    with pytest.raises(UsageError):
        LaunchPlan.from_json({"argv": []})


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--to", "ftp://x"], "--to takes local or ssh://"),
        (["--tunnel", "ssh"], "--tunnel is for --to ssh://"),
        (["--to", "ssh://b", "--nbd", "tcp:1.2.3.4:5"], "--nbd is for --target-qmp"),
        (["--to", "ssh://b", "--tls-dir", "/nonexistent-dir"], "is not a directory"),
    ],
)
def test_the_command_line_refuses_what_cannot_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    source = tmp_path / "s.sock"
    code = main(["migrate", "--source-qmp", str(source), "--work-dir", str(tmp_path), *args])
    assert code == 2
    assert message in capsys.readouterr().err


def test_the_remote_agent_answers_a_bad_request_with_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("not json"))
    assert main(["remote-target", "probe"]) == 2
    assert "not JSON" in capsys.readouterr().out


def test_the_remote_agent_probes_this_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import io
    import json

    marker = tmp_path / "m"
    marker.write_text("tok")
    request = {
        "directory": str(tmp_path / "new" / "dir"),
        "qemu": "qemu-system-x86_64",
        "address": "127.0.0.1",
        "ports": 2,
        "markers": {str(marker): "tok", str(tmp_path / "none"): "x"},
    }
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps(request)))
    assert main(["remote-target", "probe"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["dir_problem"] is None
    assert answer["markers"] == {str(marker): True, str(tmp_path / "none"): False}
    assert len(set(answer["ports"])) == 2
    assert not (tmp_path / "new").exists()  # read-only
