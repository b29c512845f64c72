package control

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/nlvpn/nlvpn/connectproxy"
	"github.com/nlvpn/nlvpn/tcplink"
	"github.com/nlvpn/nlvpn/wire"
)

// How OverAuto chooses. UDP goes first; if its handshake has no answer
// within tcpFallbackAfter (an honest gateway answers in one round trip),
// TCP/TLS starts beside it and whichever connects first is kept. If the
// last connection was over UDP, TCP waits udpWorkedAfter instead: a
// gateway that restarts is back within a few seconds, and UDP's next
// retransmission (quic-go doubles its wait: about 1.4 s, then 3 s in)
// should win then, not a TCP dial that happens to start just after the
// restart. Once TCP
// won, reconnects within rememberTCP start both at once: no wait on a
// network that blocks UDP, and UDP still wins where it passes again (it
// needs fewer round trips), which brings a node that moved to a better
// network back to UDP.
const (
	tcpFallbackAfter = 2500 * time.Millisecond
	udpWorkedAfter   = 5 * time.Second
	rememberTCP      = 10 * time.Minute
	dialTimeout      = 10 * time.Second
)

// While OverAuto holds a connection over TCP, it checks now and then
// whether UDP passes again (the node moved to a better network, or UDP
// only failed while the gateway restarted): a QUIC handshake over UDP that
// is closed at once, first udpRetryFirst in, then twice as long each time,
// up to udpRetryMax.
const (
	udpRetryFirst = 10 * time.Second
	udpRetryMax   = 5 * time.Minute
	udpRetryWait  = 3 * time.Second // for the check's handshake
)

// tryUDPAgain runs the checks until ctx ends; when one gets through it
// closes cur, the connection over TCP: the reconnect then goes over UDP.
func (c *Client) tryUDPAgain(ctx context.Context, tc *tls.Config, gw string, cur *quic.Conn) {
	wait := udpRetryFirst
	for {
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
		addr, err := resolveUDP(ctx, gw)
		if err == nil {
			pctx, cancel := context.WithTimeout(ctx, udpRetryWait)
			var qc *quic.Conn
			qc, err = c.dialQUIC(pctx, addr.AddrPort(), func(ctx context.Context, qcfg *quic.Config) (*quic.Conn, error) {
				return c.cfg.Transport.Dial(ctx, addr, tc, qcfg)
			})
			cancel()
			if err == nil {
				qc.CloseWithError(0, "only checking that UDP passes")
				c.tcpUntil.Store(0)
				c.udpWorked.Store(true)
				c.log.Info("UDP to the gateway passes again; moving the gateway connection back to UDP")
				cur.CloseWithError(0, "moving to UDP")
				return
			}
		}
		wait = min(2*wait, udpRetryMax)
	}
}

// dialed is a QUIC connection to the gateway and what carries it.
type dialed struct {
	gw    string      // the gateway's HOST:PORT
	tc    *tls.Config // what verified it
	qc    *quic.Conn
	over  string
	close func()
}

// dial connects to the gateway gw the way Config.Over says.
func (c *Client) dial(ctx context.Context, tc *tls.Config, gw string) (*dialed, error) {
	d, err := c.dialOver(ctx, tc, gw)
	if err == nil {
		d.gw, d.tc = gw, tc
	}
	return d, err
}

func (c *Client) dialOver(ctx context.Context, tc *tls.Config, gw string) (*dialed, error) {
	switch c.cfg.Over {
	case OverUDP:
		return c.dialUDP(ctx, tc, gw)
	case OverTCP:
		return c.dialTCP(ctx, tc, gw)
	case OverAuto, "":
	default:
		return nil, &FatalError{Code: wire.CodeBadRequest, Message: fmt.Sprintf("unknown transport %q (auto, udp or tcp)", c.cfg.Over)}
	}
	after := tcpFallbackAfter
	if c.udpWorked.Load() {
		after = udpWorkedAfter
	}
	if time.Now().UnixNano() < c.tcpUntil.Load() {
		after = 0
	}
	rctx, cancel := context.WithCancel(ctx)
	defer cancel()
	type result struct {
		d   *dialed
		err error
	}
	res := make(chan result, 2)
	run := func(f func(context.Context, *tls.Config, string) (*dialed, error)) {
		go func() {
			d, err := f(rctx, tc, gw)
			res <- result{d, err}
		}()
	}
	run(c.dialUDP)
	started, done := 1, 0
	startTCP := func(why string) {
		if started == 1 {
			started++
			if why != "" {
				c.log.Info(why, "gateway", gw)
			}
			run(c.dialTCP)
		}
	}
	timer := time.NewTimer(after)
	defer timer.Stop()
	var errs []error
	var fatal error
	for done < started {
		select {
		case <-timer.C:
			why := "no answer from the gateway over UDP yet; trying TCP too"
			if after == 0 {
				why = ""
			}
			startTCP(why)
		case r := <-res:
			done++
			if r.err == nil {
				if left := started - done; left > 0 {
					// The other one lost: close it if it connects.
					go func() {
						for range left {
							if o := <-res; o.err == nil {
								o.d.close()
							}
						}
					}()
				}
				c.udpWorked.Store(r.d.over == OverUDP)
				if r.d.over == OverUDP {
					c.tcpUntil.Store(0)
				} else {
					c.tcpUntil.Store(time.Now().Add(rememberTCP).UnixNano())
				}
				return r.d, nil
			}
			errs = append(errs, r.err)
			var fe *FatalError
			if errors.As(r.err, &fe) && fatal == nil {
				fatal = r.err
			}
			if ctx.Err() == nil {
				startTCP("cannot reach the gateway over UDP; trying TCP")
			}
		}
	}
	if fatal != nil {
		return nil, fatal
	}
	return nil, errors.Join(errs...)
}

// dialUDP connects over the node's UDP port.
func (c *Client) dialUDP(ctx context.Context, tc *tls.Config, gw string) (*dialed, error) {
	addr, err := resolveUDP(ctx, gw)
	if err != nil {
		return nil, err
	}
	dctx, cancel := context.WithTimeout(ctx, dialTimeout)
	// At the node's UDP size, learning a smaller one (pathsize.go).
	qc, err := c.dialQUIC(dctx, addr.AddrPort(), func(ctx context.Context, qcfg *quic.Config) (*quic.Conn, error) {
		return c.cfg.Transport.Dial(ctx, addr, tc, qcfg)
	})
	cancel()
	if err != nil {
		var te *quic.TransportError
		if errors.As(err, &te) && te.ErrorCode.IsCryptoError() {
			// A certificate that does not match the pin will not match on retry.
			return nil, &FatalError{Code: wire.CodeBadRequest, Message: "TLS handshake with gateway failed: " + err.Error()}
		}
		return nil, fmt.Errorf("over UDP: %w", err)
	}
	return &dialed{qc: qc, over: OverUDP, close: func() { qc.CloseWithError(0, "bye") }}, nil
}

// certError marks a certificate the node refused (pin or CA).
type certError struct{ error }

func (e certError) Unwrap() error { return e.error }

// dialTCP connects over TCP (through the proxy, if any): a TLS stream to
// the gateway's TCP port, verified with the same pin as QUIC, that carries
// the same QUIC connection as UDP would, packet by packet (tcplink).
func (c *Client) dialTCP(ctx context.Context, tc *tls.Config, gw string) (*dialed, error) {
	dctx, cancel := context.WithTimeout(ctx, dialTimeout)
	defer cancel()
	dialTCP := c.cfg.DialTCP
	if dialTCP == nil {
		dialTCP = (&net.Dialer{}).DialContext
	}
	over := OverTCP
	var raw net.Conn
	var err error
	if c.cfg.Proxy != nil {
		over = "tcp via proxy " + c.cfg.Proxy.Host
		raw, err = (&connectproxy.Dialer{Proxy: c.cfg.Proxy, Forward: dialTCP}).DialContext(dctx, gw)
	} else {
		raw, err = dialTCP(dctx, "tcp", gw)
	}
	if err != nil {
		return nil, fmt.Errorf("over TCP: %w", err)
	}
	ttc := tc.Clone()
	ttc.NextProtos = []string{wire.ALPNGatewayTCP}
	ttc.Certificates = nil // the node proves its key inside, in QUIC's handshake
	if verify := ttc.VerifyPeerCertificate; verify != nil {
		ttc.VerifyPeerCertificate = func(raw [][]byte, chains [][]*x509.Certificate) error {
			if err := verify(raw, chains); err != nil {
				return certError{err}
			}
			return nil
		}
	}
	sc := tls.Client(raw, ttc)
	if err := sc.HandshakeContext(dctx); err != nil {
		raw.Close()
		var ce certError
		var ve *tls.CertificateVerificationError
		if errors.As(err, &ce) || errors.As(err, &ve) {
			return nil, &FatalError{Code: wire.CodeBadRequest, Message: "TLS handshake with gateway over TCP failed (a proxy that intercepts TLS?): " + err.Error()}
		}
		return nil, fmt.Errorf("over TCP: TLS: %w", err)
	}
	pc := tcplink.NewConn(sc)
	tr := &quic.Transport{Conn: pc}
	qc, err := tr.Dial(dctx, pc.RemoteAddr(), tc, QUICConfig())
	if err != nil {
		tr.Close()
		pc.Close()
		return nil, fmt.Errorf("over TCP: %w", err)
	}
	// The stream's end is the connection's end: no need to wait for
	// QUIC's idle timeout.
	go func() {
		select {
		case <-pc.Done():
			qc.CloseWithError(0, "TCP stream to the gateway closed")
		case <-qc.Context().Done():
		}
	}()
	return &dialed{qc: qc, over: over, close: func() {
		qc.CloseWithError(0, "bye")
		tr.Close()
		pc.Close()
	}}, nil
}
