package main

import (
	"fmt"
	"os"
	"runtime/pprof"
)

// startProfile writes a CPU profile to $NLVPN_CPUPROFILE for the life of
// the process, when set: how `make bench` findings are traced to code.
func startProfile() (stop func()) {
	path := os.Getenv("NLVPN_CPUPROFILE")
	if path == "" {
		return func() {}
	}
	f, err := os.Create(fmt.Sprintf("%s.%d", path, os.Getpid()))
	if err != nil {
		fmt.Fprintf(os.Stderr, "nlvpn: NLVPN_CPUPROFILE: %v\n", err)
		return func() {}
	}
	pprof.StartCPUProfile(f)
	return func() { pprof.StopCPUProfile(); f.Close() }
}
