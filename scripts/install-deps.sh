#!/usr/bin/env bash
# Installs the system packages Ferrum's build, demo and tests need on Debian 12 (run as root).
set -euo pipefail
packages=(
  clang llvm libbpf-dev bpftool            # compile and inspect the eBPF programs
  iproute2 iputils-ping netcat-openbsd     # lab plumbing and probes
  iptables nftables                        # the Service benchmark's kube-proxy-style baselines
  iperf3 tcpdump                           # benchmarks and debugging
  podman runc containernetworking-plugins busybox-static  # the real-runtime CNI test
  iptables nftables                        # kube-proxy takeover tests
  prometheus chromium                      # promtool checks the metrics; the service map test
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
fi
# Kubernetes schema validation of deploy/ (ships its schemas: works offline once installed).
if ! command -v kubernetes-validate >/dev/null 2>&1; then
  if ! command -v pip3 >/dev/null 2>&1; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-pip
  fi
  pip3 install --quiet kubernetes-validate || pip3 install --quiet --break-system-packages kubernetes-validate
fi
# bpffs: the agent mounts it itself when missing, but tests that pin directly need it too.
if ! mount | grep -q ' /sys/fs/bpf type bpf'; then
  mount -t bpf bpf /sys/fs/bpf
fi
