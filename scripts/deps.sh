#!/usr/bin/env bash
# Installs, with apt-get, the system tools the demo, the tests and the
# benchmarks use, when any is missing. Used by `make deps` and .ci/run.
set -euo pipefail
need=()
have() { command -v "$1" >/dev/null 2>&1; }
have ip      || need+=(iproute2)
have nft     || need+=(nftables)
have curl    || need+=(curl)
have iperf3  || need+=(iperf3)
have wg      || need+=(wireguard-tools)  # bench: configures wireguard-go (userspace), the baseline
have tcpdump || need+=(tcpdump)
have ping    || need+=(iputils-ping)
have make    || need+=(make)
have ssh     || need+=(openssh-client)   # the ssh ProxyCommand test
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
have setpriv || need+=(util-linux)       # runs the client unprivileged in tests
have dig     || need+=(bind9-dnsutils)   # the DNS forwarder test asks the agent with dig
have gcc     || need+=(gcc libc6-dev)   # go test -race needs cgo
have systemd-analyze || need+=(systemd) # make units-check (no systemd is started)
have zsh     || need+=(zsh)             # the completion scripts' tests
have fish    || need+=(fish)
[ -e /etc/ssl/certs/ca-certificates.crt ] || need+=(ca-certificates)
if [ ${#need[@]} -eq 0 ]; then
	exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! have apt-get; then
	echo "missing: ${need[*]} — install them (as root, with your package manager) and run again" >&2
	exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
