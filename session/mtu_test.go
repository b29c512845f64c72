package session

import (
	"testing"

	"github.com/nlvpn/nlvpn/wire"
)

func TestSessionMTU(t *testing.T) {
	s := New(1, nil, nil)
	if s.MTU() != wire.TunMTU {
		t.Fatalf("default MTU %d, want %d", s.MTU(), wire.TunMTU)
	}
	s.SetMTU(1168)
	if err := s.Send(make([]byte, 1169)); err != ErrTooLarge {
		t.Fatalf("Send of 1169 bytes with MTU 1168: %v, want ErrTooLarge", err)
	}
	if st := s.Stats(); st.DropTooLarge != 1 {
		t.Fatalf("DropTooLarge %d, want 1", st.DropTooLarge)
	}
	s.SetMTU(9000)
	if s.MTU() != wire.TunMTU {
		t.Fatalf("SetMTU above the largest: %d, want %d", s.MTU(), wire.TunMTU)
	}
}
