#!/usr/bin/env bash
# Install what Ferry needs on a Debian 12 machine, only if it is missing.
# Sourced by scripts/demo.sh and scripts/test.sh; prints nothing on stdout.
set -euo pipefail
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v swtpm >/dev/null || need+=(swtpm)
command -v swtpm_setup >/dev/null || need+=(swtpm-tools)
dpkg -s libtss2-dev >/dev/null 2>&1 || need+=(libtss2-dev)
# The libvirt backend links libvirt (pkg-config finds it); its tests run libvirtd.
dpkg -s libvirt-dev >/dev/null 2>&1 || need+=(libvirt-dev)
command -v pkg-config >/dev/null || need+=(pkg-config)
command -v libvirtd >/dev/null || [ -x /usr/sbin/libvirtd ] || need+=(libvirt-daemon-system libvirt-daemon-driver-qemu)
command -v virsh >/dev/null || need+=(libvirt-clients)
# As root the lab (and so the demo) puts hosts in network namespaces: ip
# makes them, tc and iptables shape and break their links (`ferry lab link`).
command -v ip >/dev/null || need+=(iproute2)
command -v iptables >/dev/null || need+=(iptables)
# A real FUSE mount for the test that refuses vTPM state on a cluster filesystem.
command -v bindfs >/dev/null || need+=(bindfs)
command -v gcc >/dev/null || need+=(gcc)
command -v ld >/dev/null || need+=(binutils)
# Everything the installation prints goes to stderr: the callers' stdout is
# their result (`scripts/demo.sh --json | jq .` must see only the JSON).
if [ ${#need[@]} -gt 0 ]; then
  {
    echo "==> installing ${need[*]}"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends "${need[@]}"
  } >&2
fi
export PATH="$HOME/.cargo/bin:$PATH"
command -v cargo >/dev/null || { echo "cargo not found: install a Rust toolchain (1.85 or newer)" >&2; exit 1; }
