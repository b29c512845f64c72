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
