package netstack

import (
	"context"
	"io"
	"log/slog"
	"net"
	"testing"
	"time"
)

// BenchmarkEgressTCPDownload moves b.N bytes from a loopback server through
// the egress to a client stack (the direction of a download through the
// agent): the splice's cost per byte, next to gVisor's.
func BenchmarkEgressTCPDownload(b *testing.B) {
	block := make([]byte, 64<<10)
	dst, _ := egListenTCP(b, egLoV4, func(c net.Conn) {
		for {
			if _, err := c.Write(block); err != nil {
				return
			}
		}
	})
	n := egNewTestNet(b, EgressConfig{Logger: slog.New(slog.DiscardHandler)})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c, err := n.dialTCPFrom(ctx, egClientV4, dst)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	buf := make([]byte, 64<<10)
	b.SetBytes(1)
	b.ResetTimer()
	if _, err := io.CopyBuffer(io.Discard, io.LimitReader(onlyReader{c}, int64(b.N)), buf); err != nil {
		b.Fatal(err)
	}
}

type onlyReader struct{ io.Reader }
