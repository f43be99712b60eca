"""The livemig test guest: a real Linux VM whose workload proves a migration lost nothing.

The guest is the Debian kernel booted through its PVH entry plus a busybox initramfs whose
``/init`` runs ``workload.c``: every tick it writes a sequence-numbered record to ``/dev/vda``
with ``O_DIRECT`` and, once the write returned, prints ``heartbeat <seq>`` on the serial console;
between ticks it dirties guest RAM at a chosen rate. Typing ``poweroff`` on the console makes it
sync, print ``poweroff <last seq>`` and power off.

Host side::

    image = await ensure_built()
    spec = guest_vm_spec(image, disk=disk, qmp_socket=sock, name="src", dirty_mib_s=50)
    async with launched(spec, work_dir=work) as qemu, trio.open_nursery() as nursery:
        console = SerialConsole.of(qemu)
        nursery.start_soon(console.run)
        boot_id = await console.wait_boot()
        await console.wait_heartbeat(10)
        …
        await console.send_line("poweroff")
        last = await console.wait_poweroff()
    report = await verify_records(disk, boot_id=boot_id, last_acked=last, slack=0)
    assert report.ok

A *realistic VM* (``make_realistic_images``, ``realistic_vm_spec``) runs the same guest on the
devices a real VM has: a qcow2 root on a backing chain, a raw data disk, a CD-ROM, a network
card, an RNG and a USB tablet, given with ``-blockdev`` or ``-drive``. The workload then writes to
both disks (``livemig.disks=vda,vdb``), acknowledges each on the console
(``heartbeat 17 vda=17 vdb=17``, :meth:`SerialConsole.acked`), and ``verify_disks`` checks
every disk.
"""

from livemig.guest._build import GuestImage, default_cache_dir, ensure_built
from livemig.guest._console import Heartbeat, SerialConsole
from livemig.guest._realistic import (
    LAYER_MARKER_BOOT_ID,
    REALISTIC_DEVICE_ARGS,
    RealisticImages,
    Syntax,
    make_iso,
    make_realistic_images,
    realistic_vm_spec,
)
from livemig.guest._records import (
    RECORD_SIZE,
    DiskImage,
    DisksReport,
    Record,
    RecordReport,
    decode_record,
    encode_record,
    verify_disks,
    verify_records,
)
from livemig.guest._spec import guest_vm_spec, kernel_cmdline

__all__ = [
    "LAYER_MARKER_BOOT_ID",
    "REALISTIC_DEVICE_ARGS",
    "RECORD_SIZE",
    "DiskImage",
    "DisksReport",
    "GuestImage",
    "Heartbeat",
    "RealisticImages",
    "Record",
    "RecordReport",
    "SerialConsole",
    "Syntax",
    "decode_record",
    "default_cache_dir",
    "encode_record",
    "ensure_built",
    "guest_vm_spec",
    "kernel_cmdline",
    "make_iso",
    "make_realistic_images",
    "realistic_vm_spec",
    "verify_disks",
    "verify_records",
]
