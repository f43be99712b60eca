"""The test guest: records, console parsing, its VM spec, and the real guest booted under TCG."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Literal

import pytest
import trio
import trio.testing
from support.guest_fixtures import (  # noqa: F401  (guest_image_fixture provides "guest_image")
    booted_guest,
    guest_image_fixture,
    require_qemu,
)

from livemig.drivers import image
from livemig.guest import (
    RECORD_SIZE,
    GuestImage,
    Heartbeat,
    Record,
    SerialConsole,
    decode_record,
    default_cache_dir,
    encode_record,
    ensure_built,
    guest_vm_spec,
    verify_records,
)
from livemig.transports.errors import ProcessError, ToolError, UsageError

BOOT = 0x1234_5678_9ABC_DEF0
FAKE_IMAGE = GuestImage(Path("/k/vmlinux"), Path("/k/initrd.img"), "linux-image-x 1")


# --- records ------------------------------------------------------------------------------------


def test_record_round_trip_and_damage() -> None:
    data = encode_record(42, BOOT)
    assert len(data) == RECORD_SIZE
    assert data.startswith(b"LVMGREC1")
    assert decode_record(data) == Record(42, BOOT)
    for offset in (0, 9, 17, 25, 300, 511):  # magic, seq, boot id, crc, padding
        damaged = bytearray(data)
        damaged[offset] ^= 0x01
        assert decode_record(bytes(damaged)) is None
    assert decode_record(bytes(RECORD_SIZE)) is None
    assert decode_record(data[:-1]) is None


def write_ring(path: Path, nsectors: int, seqs: range, boot_id: int = BOOT) -> None:
    """What the workload leaves on a disk of ``nsectors`` after writing ``seqs``."""
    disk = bytearray(nsectors * RECORD_SIZE)
    for seq in seqs:
        sector = seq % nsectors
        disk[sector * RECORD_SIZE : (sector + 1) * RECORD_SIZE] = encode_record(seq, boot_id)
    path.write_bytes(bytes(disk))


def put_sector(path: Path, sector: int, data: bytes) -> None:
    with path.open("r+b") as f:
        f.seek(sector * RECORD_SIZE)
        f.write(data)


async def test_verify_records_all_present(tmp_path: Path) -> None:
    disk = tmp_path / "d.raw"
    write_ring(disk, 64, range(1, 201))  # wrapped around three times
    with trio.fail_after(5):
        report = await verify_records(disk, boot_id=BOOT, last_acked=200, slack=0)
    assert report.ok
    assert (report.checked, report.first_seq, report.missing) == (64, 137, ())


async def test_verify_records_reports_what_is_missing(tmp_path: Path) -> None:
    disk = tmp_path / "d.raw"
    write_ring(disk, 64, range(1, 101))
    put_sector(disk, 90 % 64, encode_record(26, BOOT))  # an older write won
    put_sector(disk, 95 % 64, bytes(RECORD_SIZE))
    put_sector(disk, 99 % 64, encode_record(99, BOOT + 1))  # another boot
    with trio.fail_after(5):
        report = await verify_records(disk, boot_id=BOOT, last_acked=100)
    assert not report.ok
    assert (report.checked, report.missing_count, report.missing) == (63, 3, (90, 95, 99))
    assert report.notes[0] == f"seq 90: sector 26 holds seq 26 of boot {BOOT:016x}"
    assert report.notes[1] == "seq 95: sector 31 holds zeros"
    assert report.notes[2] == f"seq 99: sector 35 holds seq 99 of boot {BOOT + 1:016x}"


async def test_verify_records_slack_and_unacked_writes(tmp_path: Path) -> None:
    disk = tmp_path / "d.raw"
    write_ring(disk, 16, range(1, 43))  # 41 and 42 written but never acknowledged
    with trio.fail_after(5):
        exact = await verify_records(disk, boot_id=BOOT, last_acked=40, slack=0)
        tolerant = await verify_records(disk, boot_id=BOOT, last_acked=40, slack=2)
    assert exact.missing == (25, 26)  # overwritten by 41 and 42
    assert tolerant.ok
    assert tolerant.first_seq == 27


async def test_verify_records_before_any_heartbeat(tmp_path: Path) -> None:
    disk = tmp_path / "d.raw"
    disk.write_bytes(bytes(4 * RECORD_SIZE))
    with trio.fail_after(5):
        report = await verify_records(disk, boot_id=BOOT, last_acked=0)
    assert report.ok
    assert report.checked == 0
    (tmp_path / "tiny.raw").write_bytes(b"x")
    with pytest.raises(UsageError):
        await verify_records(tmp_path / "tiny.raw", boot_id=BOOT, last_acked=1)


async def test_verify_records_in_qcow2(tmp_path: Path) -> None:
    require_qemu()
    raw, qcow2 = tmp_path / "d.raw", tmp_path / "d.qcow2"
    write_ring(raw, 128, range(1, 301))
    with trio.fail_after(10):
        await image.convert(raw, qcow2, source_fmt="raw", dest_fmt="qcow2")
        report = await verify_records(qcow2, boot_id=BOOT, last_acked=300, fmt="qcow2", slack=0)
    assert report.ok
    assert report.checked == 128


# --- console ------------------------------------------------------------------------------------


async def test_console_parses_the_workload(autojump_clock: trio.testing.MockClock) -> None:
    send, receive = trio.testing.memory_stream_one_way_pair()
    console = SerialConsole("vm", receive=receive)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(console.run)
            await send.send_all(b"[ 1.0] kernel noise\r\nboot 00000000000000")
            await trio.sleep(1)
            await send.send_all(b"2a\r\nworkload nsectors=8\r\nheart")
            assert await console.wait_boot() == 0x2A
            assert console.last_acked == 0
            await send.send_all(b"beat 1\r\nheartbeat 2\r\ndirtyrate 49.5\r\n")
            beat = await console.wait_heartbeat(1)
            assert beat == Heartbeat(2, trio.current_time())
            assert console.dirty_rate_mib_s == 49.5
            await send.send_all(b"heartbeat 3\r\npoweroff 3\r\n")
            assert await console.wait_poweroff() == 3
            await send.aclose()
    assert console.closed
    assert [h.seq for h in console.heartbeats] == [1, 2, 3]
    assert console.last_acked == 3
    assert console.log_text().splitlines()[:2] == ["[ 1.0] kernel noise", "boot 000000000000002a"]
    with pytest.raises(ProcessError, match="heartbeat after 3"):
        await console.wait_heartbeat()


async def test_console_waiters_fail_when_it_ends() -> None:
    send, receive = trio.testing.memory_stream_one_way_pair()
    console = SerialConsole("vm", receive=receive, max_lines=3)
    failures: list[str] = []

    async def expect_failure(wait: object) -> None:
        with pytest.raises(ProcessError) as info:
            await wait()  # type: ignore[operator]
        failures.append(str(info.value))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(console.run)
            for wait in (console.wait_boot, console.wait_heartbeat, console.wait_poweroff):
                nursery.start_soon(expect_failure, wait)
            await trio.testing.wait_all_tasks_blocked()
            await send.send_all(b"a\nb\nc\nd\npanic: the end")  # no newline at the end
            await send.aclose()
    assert len(failures) == 3
    assert "console ended" in failures[0]
    assert list(console.lines) == ["c", "d", "panic: the end"]  # bounded
    assert "panic: the end" in failures[0]


async def test_console_send_line() -> None:
    to_guest, from_host = trio.testing.memory_stream_one_way_pair()
    console = SerialConsole(
        "vm", receive=trio.testing.memory_stream_one_way_pair()[1], send=to_guest
    )
    with trio.fail_after(5):
        await console.send_line("poweroff")
        assert await from_host.receive_some() == b"poweroff\n"
        await from_host.aclose()
        with pytest.raises(ProcessError, match="cannot write"):
            await console.send_line("poweroff")
    with pytest.raises(ProcessError, match="no input"):
        await SerialConsole("vm", receive=from_host).send_line("x")


# --- spec and build -----------------------------------------------------------------------------


def test_guest_vm_spec(tmp_path: Path) -> None:
    spec = guest_vm_spec(
        FAKE_IMAGE,
        disk=tmp_path / "d.raw",
        qmp_socket=tmp_path / "q",
        name="src",
        dirty_mib_s="max",
    )
    assert spec.append.split() == [
        "console=ttyS0",
        "quiet",
        "panic=-1",
        "mitigations=off",
        "livemig.tick_ms=20",
        "livemig.dirty_mib_s=max",
        "livemig.dirty_buf_mib=64",
    ]
    assert (spec.kernel, spec.initrd) == (FAKE_IMAGE.kernel, FAKE_IMAGE.initrd)
    assert (spec.serial, spec.no_reboot, spec.incoming, spec.paused) == ("stdio", True, None, False)
    (disk,) = spec.disks
    assert (disk.path, disk.node_name, disk.fmt, disk.device_id) == (
        tmp_path / "d.raw",
        "root",
        "raw",
        "vda",
    )

    target = guest_vm_spec(
        FAKE_IMAGE, disk=tmp_path / "t.raw", qmp_socket=tmp_path / "t", name="dst", incoming=True
    )
    assert (target.incoming, target.paused) == ("defer", True)


@pytest.mark.parametrize(
    "bad",
    [{"dirty_mib_s": -1}, {"dirty_buf_mib": 400}, {"dirty_buf_mib": -1}, {"tick_ms": 0}],
)
def test_guest_vm_spec_rejects(tmp_path: Path, bad: dict[str, int]) -> None:
    with pytest.raises(UsageError):
        guest_vm_spec(FAKE_IMAGE, disk=tmp_path / "d", qmp_socket=tmp_path / "q", name="g", **bad)  # type: ignore[arg-type]


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LIVEMIG_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("LIVEMIG_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "livemig" / "guest"


async def test_build_failure_is_a_tool_error(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    with trio.fail_after(30), pytest.raises(ToolError) as info:
        await ensure_built(not_a_dir)
    assert "mkdir" in info.value.stderr


# --- the real guest -----------------------------------------------------------------------------


@pytest.mark.qemu
async def test_rebuild_is_skipped_when_nothing_changed(guest_image: GuestImage) -> None:
    before = guest_image.initrd.stat().st_mtime_ns
    with trio.fail_after(30):
        again = await ensure_built()
    assert again == guest_image
    assert again.initrd.stat().st_mtime_ns == before
    assert again.kernel.read_bytes()[:4] == b"\x7fELF"


@pytest.mark.qemu
async def test_guest_boots_and_heartbeats_continue(guest_image: GuestImage, tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with booted_guest(guest_image, tmp_path) as guest:
            first = await guest.console.wait_heartbeat(0)
            later = await guest.console.wait_heartbeat(first.seq + 25)
    seqs = [h.seq for h in guest.console.heartbeats]
    assert seqs == list(range(1, len(seqs) + 1))  # consecutive from 1
    assert guest.console.boot_ids == [guest.boot_id]
    rate = (later.seq - first.seq) / (later.at - first.at)
    assert rate > 20  # 50/s nominal (tick 20 ms); TCG on a busy host is slower


@pytest.mark.qemu
@pytest.mark.parametrize("dirty", [50, "max"])
async def test_heartbeats_flow_while_dirtying(
    guest_image: GuestImage, tmp_path: Path, dirty: int | Literal["max"]
) -> None:
    with trio.fail_after(40):
        async with booted_guest(guest_image, tmp_path, dirty_mib_s=dirty) as guest:
            first = await guest.console.wait_heartbeat(0)
            while guest.console.dirty_rate_mib_s is None:
                await guest.console.wait_heartbeat()
            await guest.console.wait_heartbeat(guest.console.last_acked + 25)
            rate = guest.console.dirty_rate_mib_s
    beats = [h for h in guest.console.heartbeats if h.seq >= first.seq]
    worst_gap = max(b.at - a.at for a, b in itertools.pairwise(beats))
    assert worst_gap < 0.5
    if dirty == "max":
        assert rate > 50
    else:
        assert 35 < rate < 65


@pytest.mark.qemu
async def test_poweroff_then_every_acked_record_is_on_disk(
    guest_image: GuestImage, tmp_path: Path
) -> None:
    with trio.fail_after(40):
        async with booted_guest(guest_image, tmp_path, dirty_mib_s=20) as guest:
            await guest.console.wait_heartbeat(30)
            acked_before = guest.console.last_acked
            await guest.console.send_line("poweroff")
            last = await guest.console.wait_poweroff()
            assert await guest.qemu.wait() == 0  # the guest powered the machine off
        report = await verify_records(guest.disk, boot_id=guest.boot_id, last_acked=last, slack=0)
    assert last >= acked_before
    assert last == guest.console.heartbeats[-1].seq
    assert report.ok, report.notes
    assert report.checked == last
