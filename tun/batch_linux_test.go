package tun

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"syscall"
	"testing"
	"time"
)

// The queue-side behaviour of BatchWriter needs no device: Write never
// touches it.
func TestBatchWriterDropsWhenFull(t *testing.T) {
	for _, tc := range []struct {
		queue, writes int
		wantDrops     uint64
	}{
		{queue: 1, writes: 1, wantDrops: 0},
		{queue: 2, writes: 5, wantDrops: 3},
		{queue: 8, writes: 8, wantDrops: 0},
		{queue: 8, writes: 100, wantDrops: 92},
	} {
		w := (&Device{}).NewBatchWriter(tc.queue)
		done := make(chan struct{})
		go func() {
			for i := range tc.writes {
				w.Write([]byte{byte(i)})
			}
			close(done)
		}()
		select {
		case <-done:
		case <-time.After(3 * time.Second):
			t.Fatalf("queue %d: Write blocked on a full queue", tc.queue)
		}
		if got := w.Drops(); got != tc.wantDrops {
			t.Errorf("queue %d, %d writes: Drops = %d, want %d", tc.queue, tc.writes, got, tc.wantDrops)
		}
		// The first packets are the ones kept, in order.
		queued, _ := w.q.Take(context.Background(), nil)
		if len(queued) != min(tc.queue, tc.writes) {
			t.Fatalf("queue %d, %d writes: %d queued", tc.queue, tc.writes, len(queued))
		}
		for i, b := range queued {
			if len(b) != Offset+1 || b[Offset] != byte(i) {
				t.Fatalf("queued packet %d = %x", i, b)
			}
		}
	}
}

func TestBatchWriterCopies(t *testing.T) {
	w := (&Device{}).NewBatchWriter(4)
	pkt := bytes.Repeat([]byte{0xaa}, 1400)
	w.Write(pkt)
	for i := range pkt {
		pkt[i] = 0 // the caller reuses its buffer at once
	}
	big := bytes.Repeat([]byte{0xbb}, w.small.size) // larger than a pooled buffer
	w.Write(big)
	queued, _ := w.q.Take(context.Background(), nil)
	b := queued[0]
	if len(b) != Offset+1400 || !bytes.Equal(b[Offset:], bytes.Repeat([]byte{0xaa}, 1400)) {
		t.Fatal("queued packet changed with the caller's buffer, or has the wrong length")
	}
	b = queued[1]
	if len(b) != Offset+len(big) || !bytes.Equal(b[Offset:], big) {
		t.Fatalf("oversize packet queued as %d bytes, want %d", len(b)-Offset, len(big))
	}
}

// A queued packet takes a buffer of the device's MTU (plus Offset), not
// more: a full queue of them is most of what the client holds under a
// download. A larger packet still goes through whole, in its own buffer.
func TestBatchWriterBuffersFollowMTU(t *testing.T) {
	const mtu = 1368
	w := (&Device{mtu: mtu}).NewBatchWriter(4)
	w.Write(bytes.Repeat([]byte{1}, mtu))
	w.Write(bytes.Repeat([]byte{2}, mtu+1))
	queued, _ := w.q.Take(context.Background(), nil)
	if len(queued) != 2 {
		t.Fatalf("%d packets queued, want 2", len(queued))
	}
	if got := cap(queued[0]); got != Offset+mtu {
		t.Errorf("a packet of the MTU queued in a buffer of %d bytes, want %d", got, Offset+mtu)
	}
	if got := queued[1]; len(got) != Offset+mtu+1 || got[Offset+mtu] != 2 {
		t.Errorf("a packet over the MTU queued as %d bytes, want %d", len(got)-Offset, mtu+1)
	}
	for _, b := range queued {
		w.recycle(b)
	}
	if len(w.small.bufs) != 1 || len(w.heads) != 0 {
		t.Errorf("recycled: %d packet buffers, %d heads; want the MTU-sized one back, alone", len(w.small.bufs), len(w.heads))
	}
}

// TestDeviceInNetns creates a real TUN device, in a network namespace of
// its own (a child process of this test binary), so nothing outside is
// touched: it checks the name and MTU, that BatchWriter delivers a packet
// into the kernel, and that Close removes the device.
func TestDeviceInNetns(t *testing.T) {
	if os.Getenv("NLVPN_TUN_CHILD") == "1" {
		deviceChild(t)
		return
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root for a TUN device and a network namespace")
	}
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		t.Skip("no /dev/net/tun")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("no ip command")
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestDeviceInNetns$", "-test.v", "-test.count=1")
	cmd.Env = append(os.Environ(), "NLVPN_TUN_CHILD=1")
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWNET}
	out, err := cmd.CombinedOutput()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			t.Fatalf("in the namespace: %v\n%s", err, out)
		}
		t.Skipf("cannot start a process in a new network namespace: %v", err)
	}
	if !bytes.Contains(out, []byte("--- PASS: TestDeviceInNetns")) {
		t.Fatalf("child did not run the test:\n%s", out)
	}
}

func deviceChild(t *testing.T) {
	// Make sure this really is a fresh namespace: only lo.
	ifs, err := net.Interfaces()
	if err != nil {
		t.Fatal(err)
	}
	if len(ifs) != 1 || ifs[0].Name != "lo" {
		t.Fatalf("not in a fresh network namespace: %v", ifs)
	}
	const name, mtu = "nlvt0", 1280
	d, err := Create(name, mtu)
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	defer func() {
		if !closed {
			d.Close()
		}
	}()
	if d.Name() != name || d.MTU() != mtu {
		t.Fatalf("Name %q MTU %d", d.Name(), d.MTU())
	}
	ifc, err := net.InterfaceByName(name)
	if err != nil {
		t.Fatal(err)
	}
	if ifc.MTU != mtu {
		t.Fatalf("kernel MTU %d, want %d", ifc.MTU, mtu)
	}
	if d.BatchSize() < 1 {
		t.Fatalf("BatchSize %d", d.BatchSize())
	}
	for _, args := range [][]string{{"link", "set", name, "up"}, {"addr", "add", "10.77.0.1/24", "dev", name}} {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %v: %v: %s", args, err, out)
		}
	}
	uc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(10, 77, 0, 1), Port: 5555})
	if err != nil {
		t.Fatal(err)
	}
	defer uc.Close()

	w := d.NewBatchWriter(64)
	ctx, cancel := context.WithCancel(context.Background())
	runDone := make(chan error, 1)
	go func() { runDone <- w.Run(ctx) }()

	payload := []byte("through the tun")
	for i := range 3 {
		w.Write(udp4(netip.MustParseAddrPort("10.77.0.2:4000"), netip.MustParseAddrPort("10.77.0.1:5555"), append(payload, byte('0'+i))))
	}
	uc.SetReadDeadline(time.Now().Add(3 * time.Second))
	buf := make([]byte, 2048)
	for i := range 3 {
		n, from, err := uc.ReadFromUDPAddrPort(buf)
		if err != nil {
			t.Fatalf("packet %d written to the TUN never reached a socket: %v (drops %d)", i, err, w.Drops())
		}
		if from != netip.MustParseAddrPort("10.77.0.2:4000") || !bytes.Equal(buf[:n], append(payload, byte('0'+i))) {
			t.Fatalf("got %q from %v", buf[:n], from)
		}
	}
	if w.Drops() != 0 {
		t.Fatalf("drops %d", w.Drops())
	}
	// A packet after a pause, with nothing queued, is written by its
	// producer (no wake-up of Run) and arrives all the same.
	for w.unsent.Load() != 0 {
		time.Sleep(time.Millisecond)
	}
	time.Sleep(2 * IdleGap)
	directs := w.directs.Load()
	w.Write(udp4(netip.MustParseAddrPort("10.77.0.2:4000"), netip.MustParseAddrPort("10.77.0.1:5555"), []byte("lone")))
	if w.directs.Load() != directs+1 {
		t.Fatalf("a packet after a pause was queued, not written directly")
	}
	uc.SetReadDeadline(time.Now().Add(3 * time.Second))
	if n, _, err := uc.ReadFromUDPAddrPort(buf); err != nil || string(buf[:n]) != "lone" {
		t.Fatalf("the directly written packet: %q, %v", buf[:n], err)
	}
	// One batch of TCP segments from more flows than the device's GRO
	// table holds items for (wireguard-go's tun has room for BatchSize
	// flows per Write and panicked past that): the writer must cut it into
	// writes the device can take (seen with 200 concurrent connections).
	wide := d.NewBatchWriter(1024)
	for i := range 3 * d.BatchSize() {
		seg := segment(0, 1000, 100, false)
		binary.BigEndian.PutUint16(seg[20:22], uint16(10000+i))
		wide.Write(seg)
	}
	wctx, wcancel := context.WithCancel(context.Background())
	wideDone := make(chan error, 1)
	go func() { wideDone <- wide.Run(wctx) }()
	time.Sleep(200 * time.Millisecond) // the batch is written (or refused) by now
	wcancel()
	<-wideDone
	cancel()
	select {
	case err := <-runDone:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("Run returned %v", err)
		}
	case <-time.After(3 * time.Second):
		t.Fatal("Run did not return after cancel")
	}

	closed = true
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(3 * time.Second)
	for {
		if _, err := net.InterfaceByName(name); err != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the device still exists after Close")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// udp4 builds an IPv4/UDP packet (UDP checksum 0: optional over IPv4).
func udp4(src, dst netip.AddrPort, payload []byte) []byte {
	b := make([]byte, 28+len(payload))
	b[0] = 0x45
	binary.BigEndian.PutUint16(b[2:], uint16(len(b)))
	b[8] = 64
	b[9] = 17
	s, d := src.Addr().As4(), dst.Addr().As4()
	copy(b[12:16], s[:])
	copy(b[16:20], d[:])
	var sum uint32
	for i := 0; i < 20; i += 2 {
		sum += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	for sum > 0xffff {
		sum = sum&0xffff + sum>>16
	}
	binary.BigEndian.PutUint16(b[10:], ^uint16(sum))
	binary.BigEndian.PutUint16(b[20:], src.Port())
	binary.BigEndian.PutUint16(b[22:], dst.Port())
	binary.BigEndian.PutUint16(b[24:], uint16(8+len(payload)))
	copy(b[28:], payload)
	return b
}

// segment builds a minimal IPv4 TCP segment of flow sport, sequence
// number seq, carrying n payload bytes, PSH set if psh.
func segment(sport byte, seq uint32, n int, psh bool) []byte {
	p := make([]byte, 40+n)
	p[0] = 0x45
	binary.BigEndian.PutUint16(p[2:4], uint16(len(p)))
	p[9] = 6
	copy(p[12:20], []byte{100, 64, 0, 2, 100, 64, 0, 3})
	p[21] = sport // source port
	p[23] = 80
	binary.BigEndian.PutUint32(p[24:28], seq)
	p[32] = 0x50
	p[33] = 0x10
	if psh {
		p[33] |= 0x08
	}
	for i := 40; i < len(p); i++ {
		p[i] = sport
	}
	return p
}

// The first segment of each run the device can coalesce (one flow,
// consecutive sequence numbers, PSH only at the end) moves into a head
// buffer with room for the run; single segments, other packets and the
// rest of a run stay in packet-sized buffers; every packet keeps its
// bytes; at most maxHeads heads per batch.
func TestPromoteHeads(t *testing.T) {
	w := (&Device{}).NewBatchWriter(256)
	pkts := [][]byte{
		segment(1, 1000, 1300, false), segment(1, 2300, 1300, false), segment(1, 3600, 500, true), // run A
		segment(1, 4100, 1300, false), segment(1, 5400, 1300, false), // after PSH: run B, same flow
		segment(2, 70, 100, false),                                // a lone segment of another flow
		{0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17},                      // not TCP
		segment(1, 9999, 1300, false),                             // a gap: alone
		segment(3, 1, 1300, false), segment(3, 1301, 1300, false), // run C
	}
	for _, p := range pkts {
		w.Write(p)
	}
	bufs, _ := w.q.Take(context.Background(), nil)
	w.promoteHeads(bufs)
	wantHead := []bool{true, false, false, true, false, false, false, false, true, false}
	for i, b := range bufs {
		if !bytes.Equal(b[Offset:], pkts[i]) {
			t.Fatalf("packet %d changed by promotion", i)
		}
		if got := cap(b) == headCap; got != wantHead[i] {
			t.Errorf("packet %d: head buffer %v, want %v", i, got, wantHead[i])
		}
	}
	for _, b := range bufs {
		w.recycle(b)
	}
	if len(w.heads) != 3 {
		t.Fatalf("%d head buffers back after the write, want 3", len(w.heads))
	}

	// Many flows, two segments each: at most maxHeads heads.
	for i := 0; i < 2*maxHeads; i++ {
		w.Write(segment(byte(10+i), 1, 500, false))
		w.Write(segment(byte(10+i), 501, 500, false))
	}
	bufs, _ = w.q.Take(context.Background(), bufs)
	w.promoteHeads(bufs)
	heads := 0
	for _, b := range bufs {
		if cap(b) == headCap {
			heads++
		}
	}
	if heads != maxHeads {
		t.Fatalf("%d heads for %d runs, want the cap %d", heads, 2*maxHeads, maxHeads)
	}
}
