//go:build !unix

package netstack

import (
	"net"

	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
)

// egCanReadRaw: elsewhere every connection is spliced with buffers held
// for its life (egSplice).
func egCanReadRaw(net.Conn) bool { return false }

func egCopyDownLazy(*gonet.TCPConn, net.Conn) int64 { panic("unreachable: egCanReadRaw is false") }
