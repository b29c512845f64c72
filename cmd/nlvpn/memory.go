package main

import (
	"os"
	"runtime/debug"
)

// clientMemoryLimit is the Go heap's soft limit for the client commands (up,
// connect, forward): a VPN client runs all day on a laptop next to
// everything else. The hot path allocates almost nothing, so what the heap
// holds between collections is mostly garbage from bursts; near the limit
// the collector runs sooner and returns memory to the system. It is soft:
// an allocation never fails because of it, the collector just works harder.
// GOMEMLIMIT in the environment overrides it.
//
// The limit bounds the anonymous half of the client's peak RSS (VmHWM):
// the collector lets the heap grow to twice what is live (GOGC 100), or to
// the limit if that comes first. The other half, ~19 MiB, is the binary's
// mapped pages, nearly all touched at start (`nlvpn --version` alone peaks
// at 17.8 MiB). Under the bench's load the live heap is ~10-13 MiB: the TUN
// writer's queue and GRO heads, the socket's send trains and receive
// buffers, quic-go's packets, wireguard-go's GRO tables. quic-go's receive
// queue is 512 packets on the client, and its read loop waits for room
// rather than drop, leaving a direct path's backlog in the socket's receive
// buffer (session.DialQUICConfigSized). At 4,096 packets that queue filled
// on every four-stream download, the live heap reached ~17 MiB, which with
// the runtime's own memory is the limit, and the collector ran back to back
// and doubled the client's CPU per GB.
//
// 24 MiB, with the TUN's buffers cut to the MTU and no heap-profile table
// (2.4 MiB the limit counted), leaves the collector the room it had at
// 26 MiB before. nlvpn-lab bench --paths direct,relay --rows stream,
// client peak direct / relay, interleaved runs: before (26 MiB, a cgo
// build) 39.9 / 39.3 and 41.0 / 38.7; after (24 MiB, CGO_ENABLED=0 as
// make build now builds) 35.8 / 36.4 and 36.8 / 35.3; the same code as a
// cgo build 39.5 / 37.2 and 37.3 / - (its libc is 1.5 MiB of it).
const clientMemoryLimit = 24 << 20

// profilerAllowance is added to the limit while NLVPN_PPROF serves
// profiles: the heap-profile table that sampling then maps (1.4 MiB), and
// a CPU profile's and an execution trace's buffers while one is taken
// (~3 MiB each), are the profiler's, not the client's. Counted against the
// client's 24 MiB they pushed its heap into the limit, and the collector,
// running again and again, took 10-20 % of the client's CPU in profiles of
// the bench's runs, while the same runs unprofiled made one or two
// collections a second.
const profilerAllowance = 8 << 20

func limitClientMemory() {
	if os.Getenv("GOMEMLIMIT") != "" {
		return
	}
	limit := int64(clientMemoryLimit)
	if os.Getenv("NLVPN_PPROF") != "" {
		limit += profilerAllowance
	}
	debug.SetMemoryLimit(limit)
}

// gatewayGCPercent is the gateway's GOGC. Its memory is mostly what it holds
// for each connected node (a QUIC connection, TLS state, three goroutines),
// live for hours, while it allocates little between registrations; with
// Go's default of 100 the heap is let grow to twice what is live before a
// collection, and the process keeps that much (RSS). At 50 it grows by half.
// The cost is collections twice as often, which at this allocation rate is
// small (registration CPU below). GOGC in the environment overrides it.
//
// BenchmarkGatewayIdleNodes, 10,000 nodes, GOGC 100 -> 50 in back-to-back
// runs: gateway RSS 1286 -> 864 MiB, Go heap+stacks 616 -> 586 MiB,
// registration CPU 14.9 -> 16.8 ms/node, idle CPU 305 -> 319 ms/s (another
// engineer's runs beside both).
const gatewayGCPercent = 50

func tuneGatewayGC() {
	if os.Getenv("GOGC") != "" {
		return
	}
	debug.SetGCPercent(gatewayGCPercent)
}
