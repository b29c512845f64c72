package platform

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"net"
	"os"
	"os/exec"
	"testing"
	"time"

	"github.com/nlvpn/nlvpn/lab"
)

// TestInboundFilter: two namespaces of the test's own joined by a veth
// pair; "a" filters what comes in on its end as the client filters its
// TUN. A connection from "b" to a listener in "a" is refused and counted;
// a connection "a" opens to "b" works both ways; once removed, "b" gets
// in again.
func TestInboundFilter(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: network namespaces and nftables")
	}
	r := make([]byte, 3)
	rand.Read(r)
	id := hex.EncodeToString(r)
	nsA, nsB := "nvif"+id+"-a", "nvif"+id+"-b"
	devA, devB := "nvif"+id+"a", "nvif"+id+"b"
	run := func(args ...string) {
		t.Helper()
		if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%v: %v: %s", args, err, out)
		}
	}
	for _, ns := range []string{nsA, nsB} {
		run("ip", "netns", "add", ns)
		t.Cleanup(func() { exec.Command("ip", "netns", "del", ns).Run() })
	}
	run("ip", "link", "add", devA, "netns", nsA, "type", "veth", "peer", "name", devB, "netns", nsB)
	run("ip", "-n", nsA, "addr", "add", "10.77.0.1/30", "dev", devA)
	run("ip", "-n", nsB, "addr", "add", "10.77.0.2/30", "dev", devB)
	for _, ns := range []string{nsA, nsB} {
		run("ip", "-n", ns, "link", "set", "lo", "up")
	}
	run("ip", "-n", nsA, "link", "set", devA, "up")
	run("ip", "-n", nsB, "link", "set", devB, "up")

	serve := func(ns, addr string) {
		ln, err := lab.Listen(ns, "tcp4", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				c.Write([]byte("hello\n"))
				c.Close()
			}
		}()
	}
	serve(nsA, "10.77.0.1:7001")
	serve(nsB, "10.77.0.2:7002")
	// dial connects from ns to addr and reads the greeting.
	dial := func(ns, addr string) error {
		return lab.Do(ns, func() error {
			c, err := net.DialTimeout("tcp4", addr, time.Second)
			if err != nil {
				return err
			}
			defer c.Close()
			c.SetReadDeadline(time.Now().Add(2 * time.Second))
			buf := make([]byte, 16)
			_, err = c.Read(buf)
			return err
		})
	}
	if err := dial(nsB, "10.77.0.1:7001"); err != nil {
		t.Fatalf("before the filter, b cannot reach a: %v", err)
	}

	var f *InboundFilter
	if err := lab.Do(nsA, func() (err error) { f, err = NewInboundFilter(devA); return err }); err != nil {
		t.Fatal(err)
	}
	if err := dial(nsB, "10.77.0.1:7001"); err == nil {
		t.Fatal("a connection from the filtered side came in")
	}
	if err := dial(nsA, "10.77.0.2:7002"); err != nil {
		t.Fatalf("a connection this side opened got no reply through the filter: %v", err)
	}
	if _, err := lab.Output(context.Background(), nsA, "ping", "-c", "1", "-W", "2", "10.77.0.2"); err != nil {
		t.Fatalf("ping replies did not pass the filter: %v", err)
	}
	var refused uint64
	if err := lab.Do(nsA, func() (err error) { refused, err = f.Refused(); return err }); err != nil {
		t.Fatal(err)
	}
	if refused == 0 {
		t.Error("the refused SYNs were not counted")
	}
	// A second filter for the same device replaces the first (a stale
	// table from a process that died).
	if err := lab.Do(nsA, func() error { _, err := NewInboundFilter(devA); return err }); err != nil {
		t.Fatalf("replacing the table: %v", err)
	}
	if err := lab.Do(nsA, f.Remove); err != nil {
		t.Fatal(err)
	}
	if err := dial(nsB, "10.77.0.1:7001"); err != nil {
		t.Fatalf("after Remove, b still cannot reach a: %v", err)
	}
	if err := lab.Do(nsA, f.Remove); err != nil {
		t.Errorf("a second Remove: %v", err)
	}
}
