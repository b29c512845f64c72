package main

import (
	"runtime/debug"
	"testing"
)

// The client's soft memory limit is 24 MiB; serving profiles adds the
// profiler's own buffers to it, and GOMEMLIMIT in the environment decides
// alone.
func TestClientMemoryLimit(t *testing.T) {
	defer debug.SetMemoryLimit(debug.SetMemoryLimit(-1))
	tests := []struct {
		name, gomemlimit, pprof string
		want                    int64
	}{
		{"default", "", "", clientMemoryLimit},
		{"profiles served", "", "127.0.0.1:6060", clientMemoryLimit + profilerAllowance},
		{"GOMEMLIMIT set", "1GiB", "127.0.0.1:6060", 12345},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Setenv("GOMEMLIMIT", tt.gomemlimit)
			t.Setenv("NLVPN_PPROF", tt.pprof)
			// A value no branch sets: with GOMEMLIMIT the runtime's limit
			// (read at start, here the test binary's) must stay untouched.
			debug.SetMemoryLimit(12345)
			limitClientMemory()
			if got := debug.SetMemoryLimit(-1); got != tt.want {
				t.Fatalf("limit %d, want %d", got, tt.want)
			}
		})
	}
}
