package main

import (
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"runtime"
	runpprof "runtime/pprof"
	"strings"
)

// startProfile serves the developer profiling knobs, each off unless its
// environment variable is set: how `make bench` findings are traced to code.
//
//	NLVPN_CPUPROFILE=FILE  a CPU profile for the life of the process (FILE.PID)
//	NLVPN_PPROF=ADDR       net/http/pprof on ADDR, which must be loopback
//	                       (the bench takes profiles of one measured run)
//
// Without NLVPN_PPROF the heap is not sampled at all (runtime.MemProfileRate
// 0, unless GODEBUG sets memprofilerate): at the default rate the runtime's
// first sampled allocation maps a 1.4 MiB table of stack buckets, and under
// load its pages are touched one by one into the process's resident memory,
// for profiles that nobody can fetch.
func startProfile() (stop func()) {
	stop = func() {}
	if addr := os.Getenv("NLVPN_PPROF"); addr != "" {
		if err := servePprof(addr); err != nil {
			fmt.Fprintf(os.Stderr, "nlvpn: NLVPN_PPROF: %v\n", err)
		}
	} else if !strings.Contains(os.Getenv("GODEBUG"), "memprofilerate=") {
		runtime.MemProfileRate = 0
	}
	path := os.Getenv("NLVPN_CPUPROFILE")
	if path == "" {
		return stop
	}
	f, err := os.Create(fmt.Sprintf("%s.%d", path, os.Getpid()))
	if err != nil {
		fmt.Fprintf(os.Stderr, "nlvpn: NLVPN_CPUPROFILE: %v\n", err)
		return stop
	}
	runpprof.StartCPUProfile(f)
	return func() { runpprof.StopCPUProfile(); f.Close() }
}

func servePprof(addr string) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return err
	}
	if ip := net.ParseIP(host); ip == nil || !ip.IsLoopback() {
		return fmt.Errorf("%q is not a loopback address; profiles are for this machine only", addr)
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	go http.Serve(ln, mux)
	slog.Debug("pprof listening", "addr", strings.TrimSpace(ln.Addr().String()))
	return nil
}
