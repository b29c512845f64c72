//go:build !linux

package platform

import (
	"fmt"
	"runtime"
)

// ConfigureDNS is not written for this OS yet: it changes nothing.
func ConfigureDNS(cfg SplitDNS) (Undo, error) {
	if len(cfg.Domains) == 0 {
		return func() error { return nil }, nil
	}
	return nil, fmt.Errorf("%w on %s yet", ErrNoSplitDNS, runtime.GOOS)
}
