// Package underlay is a node's one UDP port and everything that shares it:
// the QUIC transport that holds the gateway connection, the control client
// on it, the virtual packet conn under the peer sessions (whose default
// path is the relay), the frame mux for direct paths, and the QUIC
// transport the peer sessions run on. Agent and client both stand on it.
package underlay

import (
	"context"
	"fmt"
	"net"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/nlvpn/nlvpn/control"
	"github.com/nlvpn/nlvpn/platform"
	"github.com/nlvpn/nlvpn/punch"
	"github.com/nlvpn/nlvpn/session"
)

// Underlay is an open node port.
type Underlay struct {
	Ctrl  *control.Client
	Conn  *session.Conn   // under the peer sessions
	Mux   *punch.Mux      // probes and direct traffic
	Peers *quic.Transport // the peer sessions' QUIC transport, on Conn
	Port  uint16

	udp    *net.UDPConn
	frames *net.UDPConn
	tr     *quic.Transport
	stop   context.CancelFunc
	done   chan struct{}
}

// Open opens the port and builds the layers on it. cfg is the control
// client's configuration; Open fills in its Transport and OnRelay.
func Open(cfg control.Config) (*Underlay, error) {
	udp, frames, err := platform.ListenUDPPair(":0")
	if err != nil {
		return nil, fmt.Errorf("open UDP socket: %w", err)
	}
	u := &Underlay{udp: udp, frames: frames, Port: uint16(udp.LocalAddr().(*net.UDPAddr).Port)}
	u.tr = &quic.Transport{Conn: udp}
	cfg.Transport = u.tr
	cfg.OnRelay = func(id uint64, pkt []byte) { u.Conn.Deliver(id, pkt) }
	u.Ctrl = control.New(cfg)
	u.Conn = session.NewConn(u.Ctrl)
	u.Mux = punch.NewMux(u.tr, frames, u.Conn)
	u.Peers = &quic.Transport{Conn: u.Conn}
	return u, nil
}

// Mark sets the bypass mark on the port's sockets, so that routes the
// client adds into its TUN can never capture the tunnel's own packets.
func (u *Underlay) Mark() error {
	if err := platform.MarkSocket(u.udp); err != nil {
		return err
	}
	if u.frames != nil {
		return platform.MarkSocket(u.frames)
	}
	return nil
}

// Start runs the gateway connection and the direct-path reader. They do
// not stop with ctx's parent: at exit a node first says goodbye on its
// sessions, and those goodbyes travel on these paths; Stop ends them
// afterwards. The returned channel yields the control client's result (a
// refusal the node cannot get past).
func (u *Underlay) Start() <-chan error {
	ctx, cancel := context.WithCancel(context.Background())
	u.stop = cancel
	u.done = make(chan struct{})
	runErr := make(chan error, 1)
	go u.Mux.Run(ctx)
	go func() {
		runErr <- u.Ctrl.Run(ctx)
		close(u.done)
	}()
	return runErr
}

// Flush waits, at most d, until frames queued on either path are out: a
// session's goodbye must not die in a queue at exit.
func (u *Underlay) Flush(d time.Duration) {
	u.Mux.Flush(d)
	u.Ctrl.Flush(d)
	time.Sleep(20 * time.Millisecond) // the frame the sender holds right now
}

// Stop ends what Start started, waiting (briefly) until the gateway
// connection has said goodbye too.
func (u *Underlay) Stop() {
	if u.stop == nil {
		return
	}
	u.stop()
	select {
	case <-u.done:
	case <-time.After(2 * time.Second):
	}
}

// Close closes the peer sessions, the gateway connection and the sockets.
func (u *Underlay) Close() {
	u.Peers.Close()
	u.tr.Close()
	if u.frames != nil {
		u.frames.Close()
	}
	u.udp.Close()
}
