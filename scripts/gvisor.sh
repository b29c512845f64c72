#!/usr/bin/env bash
# Rebuilds third_party/gvisor: the gVisor module at the commit go.mod names
# (fetched with `go mod download`, its hash checked against the one pinned
# below), trimmed to the packages nlvpn builds (its netstack), plus
# third_party/gvisor-patches/*.patch applied in name order. go.mod replaces
# gvisor.dev/gvisor with that directory, so the tree is committed and a clone
# builds with plain `go build`.
#
#   scripts/gvisor.sh                  regenerate third_party/gvisor
#   scripts/gvisor.sh --check          fail if the committed tree differs
#   scripts/gvisor.sh --pristine DIR   the trimmed upstream tree, no patches
NAME=gvisor
MODULE=gvisor.dev/gvisor
VERSION=v0.0.0-20260905035102-160fafc42237
# The module's h1 hash, as in go.sum before the replace.
SUM=h1:AU5+CtCvnBnxdZRNcZt1NfSLqgkXZVT3N/u6u1aXg44=

# The packages nlvpn's build imports (go list -deps ./... | grep gvisor.dev),
# and the license. gVisor's runsc, its other subsystems and tests are left out.
KEEP_DIRS=(
	pkg/atomicbitops
	pkg/bits
	pkg/buffer
	pkg/context
	pkg/cpuid
	pkg/gohacks
	pkg/goid
	pkg/linewriter
	pkg/log
	pkg/rand
	pkg/refs
	pkg/sleep
	pkg/state
	pkg/state/wire
	pkg/sync
	pkg/sync/locking
	pkg/tcpip
	pkg/tcpip/adapters/gonet
	pkg/tcpip/checksum
	pkg/tcpip/faketime
	pkg/tcpip/hash/jenkins
	pkg/tcpip/header
	pkg/tcpip/header/parse
	pkg/tcpip/internal/tcp
	pkg/tcpip/link/channel
	pkg/tcpip/network/hash
	pkg/tcpip/network/internal/fragmentation
	pkg/tcpip/network/internal/ip
	pkg/tcpip/network/internal/multicast
	pkg/tcpip/network/ipv4
	pkg/tcpip/network/ipv6
	pkg/tcpip/ports
	pkg/tcpip/seqnum
	pkg/tcpip/stack
	pkg/tcpip/stack/gro
	pkg/tcpip/transport
	pkg/tcpip/transport/icmp
	pkg/tcpip/transport/internal/network
	pkg/tcpip/transport/internal/noop
	pkg/tcpip/transport/packet
	pkg/tcpip/transport/raw
	pkg/tcpip/transport/tcp
	pkg/tcpip/transport/tcpconntrack
	pkg/tcpip/transport/udp
	pkg/waiter
)
KEEP_FILES=(LICENSE go.mod)

. "$(dirname "$0")/patched-module.sh"
