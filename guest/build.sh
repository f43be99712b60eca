#!/usr/bin/env bash
# Build the livemig test guest into a cache directory: an uncompressed ELF vmlinux (booted with
# `qemu -kernel` through its PVH entry: ~3 s to userspace under TCG, where the bzImage takes
# over 30 s) and a gzipped newc initramfs with busybox-static, the static workload, /init and
# the virtio modules the guest needs.
#
#   build.sh CACHE_DIR
#
# Inputs: the Debian kernel package behind linux-image-amd64 (fetched with `apt-get download`,
# never installed), the host's busybox (must be static) and gcc, and the files next to this
# script. Needs apt-get, dpkg-deb, xz, gcc with a static libc, strip, readelf, cpio, gzip and
# flock. Outputs in CACHE_DIR: vmlinux, initrd.img, kernel-version, stamp. When the stamp (a
# hash of workload.c, init, this script and the kernel package version) matches and the
# outputs exist, nothing is rebuilt. The extracted kernel is kept per kernel version, so a
# change to the workload only rebuilds the initramfs. Concurrent builds of one cache are
# serialised with flock. No network other than apt.
set -euo pipefail
export LC_ALL=C PATH="$PATH:/usr/sbin:/sbin"

die() {
    echo "build.sh: $*" >&2
    exit 1
}

[[ $# -eq 1 ]] || die "usage: build.sh CACHE_DIR"
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=$1
mkdir -p "$cache"
cache=$(cd "$cache" && pwd)

exec 9>"$cache/.lock"
flock 9

# The real kernel package behind the meta-package, and its version (Debian pins it with "=").
meta=$(apt-cache show --no-all-versions linux-image-amd64) || die "apt-cache cannot show linux-image-amd64"
dep=$(sed -n 's/^Depends: *//p' <<<"$meta" | tr ',|' '\n\n' | sed -n 's/^ *\(linux-image-[0-9][^ ]*\)\(.*\)$/\1\2/p' | sed -n '1p')
kpkg=${dep%% *}
[[ -n $kpkg ]] || die "no linux-image-<version> dependency in linux-image-amd64"
if [[ $dep =~ \(=\ *([^\)]+)\) ]]; then
    kver=${BASH_REMATCH[1]}
else
    kver=$(apt-cache show --no-all-versions "$kpkg" | sed -n 's/^Version: *//p' | sed -n '1p')
fi
[[ -n $kver ]] || die "cannot find the version of $kpkg"

stamp=$(
    {
        sha256sum <"$here/workload.c"
        sha256sum <"$here/init"
        sha256sum <"$here/build.sh"
        echo "$kpkg $kver"
    } | sha256sum | cut -d' ' -f1
)
if [[ -f $cache/stamp && $(<"$cache/stamp") == "$stamp" && -f $cache/vmlinux && -f $cache/initrd.img ]]; then
    echo "guest is up to date in $cache" >&2
    exit 0
fi

tmp=$(mktemp -d "$cache/.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

# Try every XZ stream magic in the bzImage until one decompresses to an ELF file. The payload is
# followed by other data, which --single-stream ignores.
extract_vmlinux() {
    local bz=$1 out=$2 off
    for off in $(grep -obUaP '\xfd7zXZ\x00' "$bz" | cut -d: -f1); do
        xz -dc --single-stream < <(tail -c "+$((off + 1))" "$bz") >"$out" 2>/dev/null || continue
        [[ $(head -c 4 "$out" | od -An -tx1 | tr -d ' \n') == 7f454c46 ]] && return 0
    done
    return 1
}

# The .modinfo section is a list of NUL-terminated key=value strings.
module_depends() {
    tr '\0' '\n' <"$1" | sed -n 's/^depends=//p' | tr ',' ' '
}

# Kernel: extracted once per kernel package version.
kdir="$cache/kernel/${kpkg}_${kver}"
if [[ ! -f $kdir/done ]]; then
    echo "fetching $kpkg $kver" >&2
    mkdir -p "$tmp/deb"
    (cd "$tmp" && apt-get download -q "$kpkg=$kver" >&2) || die "apt-get download $kpkg=$kver failed"
    dpkg-deb -x "$tmp"/"$kpkg"_*.deb "$tmp/deb"
    rm -f "$tmp"/"$kpkg"_*.deb
    kabi=${kpkg#linux-image-}
    mkdir -p "$tmp/kernel/modules"
    extract_vmlinux "$tmp/deb/boot/vmlinuz-$kabi" "$tmp/kernel/vmlinux" ||
        die "no XZ stream in vmlinuz-$kabi decompresses to an ELF vmlinux"

    # virtio_pci and virtio_blk plus everything they depend on, decompressed.
    mdir="$tmp/deb/lib/modules/$kabi"
    [[ -d $mdir ]] || mdir="$tmp/deb/usr/lib/modules/$kabi"
    todo=(virtio_pci virtio_blk)
    declare -A seen=()
    while ((${#todo[@]})); do
        m=${todo[0]}
        todo=("${todo[@]:1}")
        [[ -z ${seen[$m]:-} ]] || continue
        seen[$m]=1
        ko=$(find "$mdir/kernel" \( -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" \) -print -quit)
        if [[ -z $ko ]]; then
            grep -q "/$m.ko\$" "$mdir/modules.builtin" 2>/dev/null || die "module $m not in $kpkg"
            continue
        fi
        case $ko in
            *.xz) xz -dc "$ko" >"$tmp/kernel/modules/$m.ko" ;;
            *.zst) zstd -qdc "$ko" >"$tmp/kernel/modules/$m.ko" ;;
            *) cp "$ko" "$tmp/kernel/modules/$m.ko" ;;
        esac
        read -r -a deps <<<"$(module_depends "$tmp/kernel/modules/$m.ko")"
        todo+=("${deps[@]}")
    done

    # Load order: a module after all of its dependencies.
    order=()
    declare -A placed=()
    pending=("$tmp"/kernel/modules/*.ko)
    while ((${#pending[@]})); do
        left=()
        for ko in "${pending[@]}"; do
            m=$(basename "$ko" .ko)
            ready=1
            for dep in $(module_depends "$ko"); do
                [[ ! -f $tmp/kernel/modules/$dep.ko || -n ${placed[$dep]:-} ]] || ready=0
            done
            if ((ready)); then
                order+=("$m")
                placed[$m]=1
            else
                left+=("$ko")
            fi
        done
        ((${#left[@]} < ${#pending[@]})) || die "module dependency cycle: ${left[*]}"
        pending=("${left[@]}")
    done
    printf '%s\n' "${order[@]}" >"$tmp/kernel/load-order"
    echo "$kpkg $kver" >"$tmp/kernel/version"
    touch "$tmp/kernel/done"
    rm -rf "$tmp/deb" "$cache/kernel"
    mkdir -p "$cache/kernel"
    mv "$tmp/kernel" "$kdir"
fi

# Initramfs.
busybox=$(command -v busybox) || die "busybox not found (install busybox-static)"
! readelf -l "$busybox" | grep -q INTERP || die "$busybox is not static (install busybox-static)"
root="$tmp/root"
mkdir -p "$root"/{bin,dev,proc,sys,lib/modules}
cp "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list); do
    [[ -e $root/bin/$applet ]] || ln -s busybox "$root/bin/$applet"
done
gcc -static -O2 -Wall -Wextra -Werror -o "$root/bin/workload" "$here/workload.c"
strip "$root/bin/workload"
install -m 0755 "$here/init" "$root/init"
cp "$kdir"/modules/*.ko "$kdir/load-order" "$root/lib/modules/"
(cd "$root" && find . -mindepth 1 | sort | cpio -o -H newc -R 0:0 --quiet) | gzip -9n >"$tmp/initrd.img"

cp "$kdir/version" "$tmp/kernel-version"
echo "$stamp" >"$tmp/stamp"
# The stamp goes last: an interrupted build never looks up to date. Renames keep a QEMU that
# has the old files open unaffected.
rm -f "$cache/stamp"
if [[ ! $kdir/vmlinux -ef $cache/vmlinux ]]; then
    ln -f "$kdir/vmlinux" "$tmp/vmlinux" 2>/dev/null || cp "$kdir/vmlinux" "$tmp/vmlinux"
    mv -f "$tmp/vmlinux" "$cache/vmlinux"
fi
mv -f "$tmp/initrd.img" "$tmp/kernel-version" "$cache/"
mv "$tmp/stamp" "$cache/stamp"
echo "guest built in $cache" >&2
