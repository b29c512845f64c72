package session

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/nlvpn/nlvpn/wire"
)

// connectWith is peerPair.connect with the client's QUIC configuration.
func (p *peerPair) connectWith(t *testing.T, id uint64, cfg *quic.Config) (client, agent *quic.Conn) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	ctls, err := ClientTLS(p.clientKey, p.agentKey.Public())
	if err != nil {
		t.Fatal(err)
	}
	acc := make(chan *quic.Conn, 1)
	go func() {
		c, _ := p.ln.Accept(ctx)
		acc <- c
	}()
	if client, err = p.clientTr.Dial(ctx, Addr(id), ctls, cfg); err != nil {
		t.Fatalf("Dial: %v", err)
	}
	if agent = <-acc; agent == nil {
		t.Fatal("Accept failed")
	}
	t.Cleanup(func() {
		client.CloseWithError(0, "")
		agent.CloseWithError(0, "")
	})
	return client, agent
}

// TestSessionDialSideWaitsForItsReceiver: on the dialing side (the
// client), a receiver that stops for a while (its TUN device busy) loses
// nothing of a burst three times its QUIC connection's queue
// (DialRecvQueueLen): quic-go's read loop waits, and the rest of the burst
// waits in the session Conn's queue. The same short queue without the
// wait drops the overflow: that is what the wait is for.
func TestSessionDialSideWaitsForItsReceiver(t *testing.T) {
	for i, tc := range []struct {
		name string
		wait time.Duration
	}{
		// Not DialRecvWait: the receiver here stops for as long as the
		// sender takes to send the burst, which on a loaded machine under
		// -race can be longer. Longer than the test waits for the packets
		// once the receiver goes on, so that a lost wake-up fails the test
		// rather than be ended by the timeout.
		{"wait", 30 * time.Second},
		{"drop", 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := newPeerPair(t)
			id := uint64(0x5e55_0010_00 + i)
			cfg := DialQUICConfigSized(wire.PeerPacketSize)
			cfg.UnprocessedPacketsWait = tc.wait
			cq, aq := p.connectWith(t, id, cfg)
			cs, as := New(id, cq, quietLog()), New(id, aq, quietLog())
			rx := newCollector()
			gate := make(chan struct{})
			var open sync.Once
			openGate := func() { open.Do(func() { close(gate) }) }
			// Registered after connectWith's, so it runs first: a test
			// that fails with the gate shut must not leave the client's
			// connection blocked in recv, which its close would wait for.
			t.Cleanup(openGate)
			startSession(cs, func(pkt []byte) {
				<-gate
				rx.recv(pkt)
				ReleasePacket(pkt)
			})
			startSession(as, func([]byte) {})

			const n = 3 * DialRecvQueueLen
			for seq := uint32(0); seq < n; seq++ {
				if err := as.SendWait(testPacket(seq, 'a')); err != nil {
					t.Fatal(err)
				}
			}
			// The burst has arrived once the client's Conn stops taking
			// packets in (they are all there, in its queue or quic-go's,
			// or dropped).
			last, still := -1, 0
			for deadline := time.Now().Add(10 * time.Second); still < 20; time.Sleep(5 * time.Millisecond) {
				if time.Now().After(deadline) {
					t.Fatal("the burst never stopped arriving")
				}
				if got := int(p.agentRelay.packets.Load()); got == last {
					still++
				} else {
					last, still = got, 0
				}
			}
			openGate()

			dropped := func() uint64 { return cq.ConnectionStats().PacketsDropped }
			if tc.wait == 0 {
				if dropped() == 0 {
					t.Fatalf("no packet dropped without the wait: the burst (%d) fit the queue (%d), so the test shows nothing", n, DialRecvQueueLen)
				}
				t.Logf("without the wait: %d dropped", dropped())
				return
			}
			// The sender's own queue may have dropped some of the burst
			// (SendWait's bound, if its connection was starved of CPU);
			// every packet it sent must arrive.
			sent := n - int(as.Stats().DropQueueFull)
			for deadline := time.Now().Add(10 * time.Second); rx.count() < sent && time.Now().Before(deadline); {
				time.Sleep(time.Millisecond)
			}
			inFull, _ := p.clientConn.Drops()
			if rx.count() != sent || dropped() != 0 || inFull != 0 {
				t.Fatalf("received %d of the %d sent; dropped by quic-go's queue %d, by the Conn's %d", rx.count(), sent, dropped(), inFull)
			}
			if sent == n {
				rx.verify(t, n, 'a')
			} else {
				t.Logf("the sender dropped %d of the burst", n-sent)
				rx.verifyReceived(t, 'a')
			}
		})
	}
}
