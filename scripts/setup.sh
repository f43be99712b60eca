#!/usr/bin/env bash
# Install everything livemig needs on Debian 12 (bookworm), as root:
#   QEMU 10.0 from bookworm-backports (Debian 12's QEMU 7.2 loses guest pages under TCG during
#   migration: measured), qemu-utils, graphviz, busybox-static and the tools the test guest's
#   build uses, xorriso (the realistic VM's CD-ROM image), OpenSSH, openssl and iproute2 (the
#   two-host tests: an sshd and x509 credentials in network namespaces); then the Python package
#   in .venv and the test guest. No system sshd is started: the tests start their own.
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

# openssh-server's postinst would start a system sshd: while apt-get installs, a policy-rc.d
# that exits 101 forbids every service start (invoke-rc.d and deb-systemd-invoke obey it). One the
# machine has already is set aside and put back, also when the install fails.
policy=/usr/sbin/policy-rc.d
forbid_service_starts() {
  # An earlier run that died here left its own policy-rc.d and the saved one: keep the saved one.
  if [ ! -e "$policy.livemig-saved" ] && { [ -e "$policy" ] || [ -L "$policy" ]; }; then
    $sudo_ mv "$policy" "$policy.livemig-saved"
  fi
  trap allow_service_starts EXIT
  printf '#!/bin/sh\n# livemig setup: no service starts while packages install\nexit 101\n' |
    $sudo_ tee "$policy" >/dev/null
  $sudo_ chmod 0755 "$policy"
}
allow_service_starts() {
  $sudo_ rm -f "$policy"
  if [ -e "$policy.livemig-saved" ] || [ -L "$policy.livemig-saved" ]; then
    $sudo_ mv "$policy.livemig-saved" "$policy"
  fi
  trap - EXIT
}

packages=(busybox-static graphviz xz-utils zstd cpio gzip gcc libc6-dev binutils xorriso
  openssh-server openssh-client openssl iproute2)
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
    forbid_service_starts
    $sudo_ apt-get install -y -q --no-install-recommends "${missing[@]}"
    allow_service_starts
  fi
fi
# sshd's privilege-separation directory: the two-host tests' sshd refuses to start without it,
# and /run is emptied at boot (the lab creates it too).
$sudo_ install -d -m 0755 /run/sshd
# The guest build fetches the Debian kernel package with apt-get download: it needs fresh lists.
if [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages' -print -quit 2>/dev/null)" ]; then
  $sudo_ apt-get update -q
fi

if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
.venv/bin/pip install -q --disable-pip-version-check -e ".${extras}"
.venv/bin/python -m livemig.guest build
echo "setup: done ($(qemu-system-x86_64 --version | head -n 1))"
