#!/usr/bin/env bash
# Install everything livemig needs on Debian 12 (bookworm), as root:
#   QEMU 10.0 from bookworm-backports (Debian 12's QEMU 7.2 loses guest pages under TCG during
#   migration: measured), qemu-utils, graphviz, busybox-static and the tools the test guest's
#   build uses, xorriso (the realistic VM's CD-ROM image); then the Python package in .venv and
#   the test guest.
# Usage: scripts/setup.sh [--dev]     (--dev adds the test and lint tools)
# Safe to run again: every step checks first.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
if [ "${1:-}" = "--dev" ]; then extras="[test]"; fi

sudo_=""
if [ "$(id -u)" -ne 0 ]; then sudo_="sudo"; fi
export DEBIAN_FRONTEND=noninteractive

have_qemu10() {
  command -v qemu-system-x86_64 >/dev/null &&
    qemu-system-x86_64 --version | grep -Eq 'version (1[0-9]|[2-9][0-9])\.'
}

add_backports() {
  # Reuse the machine's own Debian source and change only its suite: no mirror is named here.
  local list=/etc/apt/sources.list.d/livemig-backports.sources
  [ -e "$list" ] && return 0
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    awk 'BEGIN { RS = ""; ORS = "\n\n" }
         /(^|\n)Suites: bookworm( |\n|$)/ && !done {
           sub(/Suites: [^\n]*/, "Suites: bookworm-backports"); print; done = 1 }' \
      /etc/apt/sources.list.d/debian.sources | $sudo_ tee "$list" >/dev/null
  elif [ -f /etc/apt/sources.list ]; then
    list=/etc/apt/sources.list.d/livemig-backports.list
    grep -E '^deb [^#]* bookworm( |$)' /etc/apt/sources.list | head -n 1 |
      sed -E 's/ bookworm( |$)/ bookworm-backports\1/' | $sudo_ tee "$list" >/dev/null
  fi
  if [ ! -s "$list" ]; then
    echo "setup: found no Debian bookworm apt source to derive bookworm-backports from" >&2
    exit 1
  fi
}

packages=(busybox-static graphviz xz-utils zstd cpio gzip gcc libc6-dev binutils xorriso)
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ! have_qemu10 || [ "${#missing[@]}" -gt 0 ] || [ -n "${LIVEMIG_APT_UPDATE:-}" ]; then
  have_qemu10 || add_backports
  $sudo_ apt-get update -q
  if ! have_qemu10; then
    $sudo_ apt-get install -y -q --no-install-recommends -t bookworm-backports \
      qemu-system-x86 qemu-utils
  fi
  if [ "${#missing[@]}" -gt 0 ]; then
    $sudo_ apt-get install -y -q --no-install-recommends "${missing[@]}"
  fi
fi
# The guest build fetches the Debian kernel package with apt-get download: it needs fresh lists.
if [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages' -print -quit 2>/dev/null)" ]; then
  $sudo_ apt-get update -q
fi

if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
.venv/bin/pip install -q --disable-pip-version-check -e ".${extras}"
.venv/bin/python -m livemig.guest build
echo "setup: done ($(qemu-system-x86_64 --version | head -n 1))"
