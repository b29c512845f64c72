package agent

import (
	"context"
	"errors"
	"testing"

	"github.com/quic-go/quic-go"

	"github.com/nlvpn/nlvpn/session"
	"github.com/nlvpn/nlvpn/wire"
)

// Only a session the gateway offered (and the agent accepted) gets a
// handshake; any other session ID is refused at its first packet and
// counted.
func TestAdmitConnOnlyOfferedSessions(t *testing.T) {
	a := &Agent{offers: map[uint64]*offer{7: {Session: &wire.Session{ID: 7}}}}
	for _, tt := range []struct {
		id   uint64
		want error
	}{{7, nil}, {8, errUnoffered}, {0, errUnoffered}} {
		_, err := a.admitConn(context.Background(), &quic.ClientInfo{RemoteAddr: session.Addr(tt.id)})
		if !errors.Is(err, tt.want) {
			t.Errorf("session %d: %v, want %v", tt.id, err, tt.want)
		}
	}
	if got := a.dropUnoffered.Load(); got != 2 {
		t.Fatalf("unoffered_conn %d, want 2", got)
	}
}
