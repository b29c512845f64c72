//go:build !unix

package gateway

import (
	"testing"
	"time"
)

// cpuTime: no getrusage here; the idle-CPU checks are skipped.
func cpuTime(t *testing.T) time.Duration {
	t.Skip("needs getrusage")
	return 0
}
