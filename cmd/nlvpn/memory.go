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
// 26 MiB holds the client's peak RSS (VmHWM) under a bulk transfer to
// ~36-38 MiB, the Go heap plus ~10 MiB of mapped binary (nlvpn-lab bench
// --paths direct, two interleaved rounds: 26 MiB 37.6, 35.6 MiB; 32 MiB
// 41.0, 40.8 MiB). The live heap is ~12 MiB (buffers of the socket, the
// TUN and quic-go), so the collector runs more often: client CPU per GB
// uploaded 4.03, 5.79 s against 3.77, 4.34 s in the same rounds, with
// throughput within the machine's noise (up 1607, 1150 vs 1723, 1461 Mbit/s;
// down 1413, 1221 vs 1363, 1326).
const clientMemoryLimit = 26 << 20

func limitClientMemory() {
	if os.Getenv("GOMEMLIMIT") != "" {
		return
	}
	debug.SetMemoryLimit(clientMemoryLimit)
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
