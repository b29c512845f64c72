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
const clientMemoryLimit = 32 << 20

func limitClientMemory() {
	if os.Getenv("GOMEMLIMIT") != "" {
		return
	}
	debug.SetMemoryLimit(clientMemoryLimit)
}
