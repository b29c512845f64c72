package gateway

import (
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"runtime"
	"runtime/pprof"
	"sync/atomic"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/nlvpn/nlvpn/control"
	"github.com/nlvpn/nlvpn/identity"
	"github.com/nlvpn/nlvpn/token"
	"github.com/nlvpn/nlvpn/wire"
)

// The fuzz input is a script for two fake nodes, a client (node 0) and an
// agent (node 1), that speak to a real gateway over loopback QUIC. Each
// step is one byte: the low nibble is the op, bit 4 the node; some ops
// take argument bytes after it. A missing byte reads as 0.
const (
	opHello       = iota // the node's own valid credential
	opBadHello           // the other node's credential: not bound to this key
	opConnect            // arg: target, resume, mode, message ID
	opReply              // answer the last request the gateway sent; arg: kind
	opFrame              // a length-prefixed body of arg bytes from the input
	opOddMessage         // a well-formed message the gateway does not expect; arg: which
	opFragment           // 1 to 3 raw bytes: a torn length prefix or message
	opHugeLength         // a length prefix over wire.MaxMessageSize
	opBye                // close the stream's write side, cleanly
	opCloseConn          // close the connection
	opReconnect          // close the connection, if any, and dial again
	opSleep              // arg: milliseconds, up to 31
	opResetStream        // abort the stream's write side (RESET_STREAM)
	opStopReading        // abort the stream's read side (STOP_SENDING)
	numOps

	nodeBit = 0x10
)

const (
	fuzzMaxSteps = 48               // per input
	fuzzInput    = 10 * time.Second // an input taking longer hangs
	fuzzSettle   = 5 * time.Second  // for the gateway to forget the nodes
	fuzzWrite    = time.Second      // a write that waits longer is dropped
)

// fuzzRig is one gateway and the credentials of the two fake nodes, shared
// by every input of one fuzzing process.
type fuzzRig struct {
	tg   *testGateway
	keys [2]*identity.Key
	cred [2]string
}

func newFuzzRig(tb testing.TB) *fuzzRig {
	tg := startGatewayWith(tb, nil)
	r := &fuzzRig{tg: tg}
	claims := [2]token.Claims{
		{Role: token.RoleClient, Name: "fz-client", Agents: []string{"*"}},
		{Role: token.RoleAgent, Name: "fz-agent"},
	}
	for i := range r.keys {
		k, err := identity.Generate()
		if err != nil {
			tb.Fatal(err)
		}
		c := claims[i]
		c.Expires = time.Now().Add(time.Hour).Unix()
		c.Gateway, c.Pin = tg.g.Addr().String(), tg.g.Pin()
		t, err := token.Issue(tg.authority, c)
		if err != nil {
			tb.Fatal(err)
		}
		tok, err := token.ParseToken(t)
		if err != nil {
			tb.Fatal(err)
		}
		r.keys[i], r.cred[i] = k, tok.Enroll(k.Public())
	}
	// Warm up: once an agent has registered, every goroutine the gateway
	// keeps while idle is running, so that each input's count of them
	// before it starts is the count to come back to.
	if err := r.play(seed(step(opHello, 1), step(opSleep, 1, 31)), -1); err != nil {
		tb.Fatal(err)
	}
	return r
}

// fakeNode is one fake node's socket and, while it has one, connection.
type fakeNode struct {
	rig *fuzzRig
	i   int
	tr  *quic.Transport
	qc  *quic.Conn
	st  *quic.Stream
	// What the gateway sent it, read by its reader goroutine: the ID of
	// the last request (a session offer), the last session ID seen.
	lastReq, lastSession atomic.Uint64
}

func (r *fuzzRig) newFakeNode(i int) (*fakeNode, error) {
	uc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		return nil, err
	}
	return &fakeNode{rig: r, i: i, tr: &quic.Transport{Conn: uc}}, nil
}

func (n *fakeNode) dial() {
	cert, err := n.rig.keys[n.i].Certificate()
	if err != nil {
		panic(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	qc, err := n.tr.Dial(ctx, n.rig.tg.g.Addr(), &tls.Config{
		MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{cert},
		NextProtos: []string{wire.ALPNGateway}, InsecureSkipVerify: true,
		VerifyPeerCertificate: identity.VerifyPin(n.rig.tg.g.Pin()),
	}, control.QUICConfig())
	if err != nil {
		return // refused (a limit) or timed out: the script goes on without
	}
	st, err := qc.OpenStream()
	if err != nil {
		qc.CloseWithError(0, "")
		return
	}
	n.qc, n.st = qc, st
	go func() { // ends with the connection
		for {
			m, err := wire.ReadMessage(st)
			if err != nil {
				return
			}
			if m.ID != 0 && m.Type == wire.TypeSession {
				n.lastReq.Store(m.ID)
			}
			if m.Session != nil {
				n.lastSession.Store(m.Session.ID)
			}
		}
	}()
}

func (n *fakeNode) closeConn() {
	if n.qc != nil {
		n.qc.CloseWithError(0, "fuzz")
		n.qc, n.st = nil, nil
	}
}

func (n *fakeNode) close() {
	n.closeConn()
	n.tr.Close()
	n.tr.Conn.Close()
}

func (n *fakeNode) write(b []byte) {
	if n.st == nil {
		return
	}
	n.st.SetWriteDeadline(time.Now().Add(fuzzWrite))
	n.st.Write(b)
}

func (n *fakeNode) send(m *wire.Message) {
	var b bytes.Buffer
	if err := wire.WriteMessage(&b, m); err == nil {
		n.write(b.Bytes())
	}
}

// script reads a fuzz input.
type script struct {
	b []byte
	i int
}

func (s *script) next() byte {
	if s.i >= len(s.b) {
		s.i++
		return 0
	}
	s.i++
	return s.b[s.i-1]
}

func (s *script) done() bool { return s.i >= len(s.b) }

// step runs one op.
func (r *fuzzRig) step(s *script, nodes [2]*fakeNode) {
	b := s.next()
	n := nodes[(b&nodeBit)>>4]
	op := int(b&0x0f) % numOps
	if n.qc == nil && op != opReconnect && op != opSleep {
		n.dial() // a node's first word dials
	}
	switch op {
	case opHello:
		h := &wire.Hello{Token: r.cred[n.i], Version: wire.ProtocolVersion}
		if n.i == 1 {
			h.Advertise = lan
		}
		n.send(&wire.Message{Type: wire.TypeHello, Hello: h})
	case opBadHello:
		n.send(&wire.Message{Type: wire.TypeHello, Hello: &wire.Hello{Token: r.cred[1-n.i]}})
	case opConnect:
		a, resume, mode, id := s.next(), s.next(), s.next(), s.next()
		c := &wire.Connect{Agent: "fz-agent"}
		if a&1 != 0 {
			c.Agent = "nosuch"
		}
		switch resume % 3 {
		case 1:
			c.Resume = n.lastSession.Load() // a session it had
		case 2:
			c.Resume = uint64(resume) // one it never had
		}
		c.Mode = []string{wire.ModeAuto, wire.ModeDirect, wire.ModeRelay, wire.ModeAuto}[mode%4]
		n.send(&wire.Message{Type: wire.TypeConnect, ID: uint64(id), Connect: c})
	case opReply:
		id := n.lastReq.Load()
		switch s.next() % 4 {
		case 0:
			n.send(&wire.Message{Type: wire.TypeAccept, ID: id, Accept: &wire.Accept{ID: n.lastSession.Load()}})
		case 1:
			n.send(&wire.Message{Type: wire.TypeError, ID: id, Error: &wire.Error{Code: wire.CodeForbidden, Message: "no"}})
		case 2: // the wrong type of answer
			n.send(&wire.Message{Type: wire.TypeSession, ID: id, Session: &wire.Session{ID: 1}})
		case 3: // an answer twice
			m := &wire.Message{Type: wire.TypeAccept, ID: id, Accept: &wire.Accept{}}
			n.send(m)
			n.send(m)
		}
	case opFrame:
		k := int(s.next() % 64)
		body := make([]byte, 0, k)
		for range k {
			body = append(body, s.next())
		}
		n.write(frame(string(body)))
	case opOddMessage:
		odd := []*wire.Message{
			{Type: wire.TypeWelcome, Welcome: &wire.Welcome{Name: "me"}},
			{Type: wire.TypeGone, Gone: &wire.Gone{ID: 1}},
			{Type: wire.TypeRevoked, Revoked: &wire.Revoked{IDs: []uint64{1, 2}}},
			{Type: wire.TypePeerInfo, Peer: &wire.PeerInfo{Name: "x"}},
			{Type: wire.TypeError, Error: &wire.Error{Code: wire.CodeBadRequest, Message: "?"}},
			{Type: wire.TypeAccept, ID: 7, Accept: &wire.Accept{ID: 7}},
		}
		n.send(odd[int(s.next())%len(odd)])
	case opFragment:
		k := 1 + int(s.next()%3)
		raw := make([]byte, k)
		for j := range raw {
			raw[j] = s.next()
		}
		n.write(raw)
	case opHugeLength:
		n.write([]byte{0xff, 0xff, 0xff, 0xff})
	case opBye:
		if n.st != nil {
			n.st.Close()
		}
	case opCloseConn:
		n.closeConn()
	case opReconnect:
		n.closeConn()
		n.dial()
	case opSleep:
		time.Sleep(time.Duration(s.next()%32) * time.Millisecond)
	case opResetStream:
		if n.st != nil {
			n.st.CancelWrite(0)
		}
	case opStopReading:
		if n.st != nil {
			n.st.CancelRead(0)
		}
	}
}

// run plays one input and leaves; it returns once the gateway forgot the
// nodes, or with what it did not forget.
func (r *fuzzRig) run(data []byte) error { return r.play(data, runtime.NumGoroutine()) }

// play is run, with the goroutines to come back to (base < 0: any).
func (r *fuzzRig) play(data []byte, base int) error {
	var nodes [2]*fakeNode
	for i := range nodes {
		n, err := r.newFakeNode(i)
		if err != nil {
			return err
		}
		defer n.close()
		nodes[i] = n
	}
	s := &script{b: data}
	for steps := 0; !s.done() && steps < fuzzMaxSteps; steps++ {
		r.step(s, nodes)
	}
	for _, n := range nodes {
		n.close()
	}
	// Back to idle: no goroutine, route, slot or registration left of
	// the nodes.
	g := r.tg.g
	idle := func() string {
		g.mu.Lock()
		agents, live := len(g.agents), len(g.live)
		g.mu.Unlock()
		switch {
		case base >= 0 && runtime.NumGoroutine() > base:
			return fmt.Sprintf("%d goroutines, %d before", runtime.NumGoroutine(), base)
		case g.RelayStats().Routes != 0:
			return fmt.Sprintf("%d relay routes", g.RelayStats().Routes)
		case g.adm.unauthenticated() != 0:
			return fmt.Sprintf("%d unauthenticated connections", g.adm.unauthenticated())
		case agents != 0 || live != 0:
			return fmt.Sprintf("%d agents and %d overlay addresses registered", agents, live)
		}
		return ""
	}
	deadline := time.Now().Add(fuzzSettle)
	for {
		left := idle()
		if left == "" {
			return nil
		}
		if time.Now().After(deadline) {
			var dump bytes.Buffer
			pprof.Lookup("goroutine").WriteTo(&dump, 1)
			return fmt.Errorf("%v after the nodes left:\n%s", left, dump.String())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// seed builds a fuzz input from steps.
func seed(steps ...[]byte) []byte { return bytes.Join(steps, nil) }

func step(op int, node int, args ...byte) []byte {
	return append([]byte{byte(op) | byte(node)<<4}, args...)
}

// FuzzGatewayMessages drives the gateway's message loop, before and after
// registration, with scripts for a client and an agent: hellos good and
// bad, connects, answers of every kind, garbage, torn messages, closes
// and reconnects at any moment. Whatever the script, the gateway must not
// panic, each input must end within fuzzInput, and once the nodes have
// left the gateway must be back to idle: the spin where a connect retried
// for ever on a closed peer fails the last.
func FuzzGatewayMessages(f *testing.F) {
	const client, agent = 0, 1
	hello := func(n int) []byte { return step(opHello, n) }
	connect := func(args ...byte) []byte { return step(opConnect, client, args...) }
	seeds := [][]byte{
		// Register both, connect, the agent accepts, the client leaves.
		seed(hello(agent), hello(client), connect(0, 0, 0, 1), step(opSleep, client, 10), step(opReply, agent, 0), step(opSleep, client, 10), step(opCloseConn, client)),
		// The client leaves mid-connect, before the agent answers.
		seed(hello(agent), hello(client), connect(0, 0, 0, 1), step(opCloseConn, client), step(opSleep, agent, 10), step(opReply, agent, 0)),
		// The agent leaves mid-connect.
		seed(hello(agent), hello(client), connect(0, 0, 0, 1), step(opSleep, agent, 5), step(opCloseConn, agent), step(opSleep, client, 20)),
		// Resume a session, reconnecting in between; refuse, answer twice.
		seed(hello(agent), hello(client), connect(0, 0, 2, 1), step(opSleep, agent, 10), step(opReply, agent, 3), step(opReconnect, client), hello(client), connect(0, 1, 0, 2), step(opSleep, agent, 10), step(opReply, agent, 1)),
		// The wrong kind of answer, an unknown agent, connect from an agent.
		seed(hello(agent), hello(client), connect(0, 0, 1, 3), step(opSleep, agent, 10), step(opReply, agent, 2), connect(1, 0, 0, 4), step(opConnect, agent, 0, 0, 0, 5)),
		// Before registration: garbage, a torn prefix, a huge length, a
		// bad credential, a message of the wrong kind, a clean bye.
		seed(step(opFrame, client, 5, 'g', 'a', 'r', 'b', '{')),
		seed(step(opFragment, client, 1, 0), step(opSleep, client, 20)),
		seed(step(opHugeLength, agent)),
		seed(step(opBadHello, client)),
		seed(step(opOddMessage, agent, 0), hello(agent)),
		seed(connect(0, 0, 0, 1)),
		seed(step(opBye, client)),
		// After registration: odd messages, garbage, resets, hello twice.
		seed(hello(agent), hello(client), step(opOddMessage, client, 1), step(opOddMessage, agent, 5), hello(client), step(opFrame, agent, 2, '{', '}'), step(opResetStream, client), step(opStopReading, agent)),
		// The agent replaced by itself while a connect waits on it.
		seed(hello(agent), hello(client), connect(0, 0, 0, 1), step(opReconnect, agent), hello(agent), step(opSleep, client, 20), connect(0, 0, 0, 2)),
		// A burst of connects past the per-client bound.
		seed(hello(agent), hello(client), connect(0, 0, 0, 1), connect(0, 0, 0, 2), connect(0, 0, 0, 3), connect(0, 0, 0, 4), connect(0, 0, 0, 5), connect(0, 0, 0, 6), step(opCloseConn, agent)),
	}
	for _, s := range seeds {
		f.Add(s)
	}
	rig := newFuzzRig(f)
	f.Fuzz(func(t *testing.T, data []byte) {
		done := make(chan error, 1)
		go func() { done <- rig.run(data) }()
		select {
		case err := <-done:
			if err != nil {
				t.Fatal(err)
			}
		case <-time.After(fuzzInput):
			var dump bytes.Buffer
			pprof.Lookup("goroutine").WriteTo(&dump, 1)
			t.Fatalf("an input ran for more than %v:\n%s", fuzzInput, dump.String())
		}
	})
}
