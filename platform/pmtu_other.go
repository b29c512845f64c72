//go:build !linux

package platform

import (
	"errors"
	"net/netip"
)

// PathMTU is not known on this OS: nodes learn a small path by trying
// (control) or take --mtu.
func PathMTU(dst netip.Addr) (int, error) {
	return 0, errors.New("the kernel's path MTU is not read on this OS")
}

// SetMTU is not supported on this OS (the TUN mode is Linux only).
func SetMTU(ifname string, mtu int) error {
	return errors.New("setting an interface MTU is not supported on this OS")
}
