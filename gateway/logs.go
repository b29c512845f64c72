package gateway

import (
	"context"
	"log/slog"
	"sync"
	"time"
)

// refusalLogEvery is how often one kind of refusal is logged at most. A
// stranger with a script must not fill the disk, or drown the lines a
// person looks for; the counters (nlvpn_gateway_refused_total) count
// every one, and each line says how many like it were left out.
const refusalLogEvery = 10 * time.Second

// logLimiter lets one line per reason through per window.
type logLimiter struct {
	every time.Duration
	now   func() time.Time // time.Now; tests set it

	mu         sync.Mutex
	last       [numReasons]time.Time // when a line last went through
	suppressed [numReasons]uint64    // lines held back since
}

func newLogLimiter(every time.Duration) *logLimiter {
	return &logLimiter{every: every, now: time.Now}
}

// allow reports whether a line for r may go out now and, if so, how many
// were held back since the last one that did.
func (l *logLimiter) allow(r reason) (ok bool, suppressed uint64) {
	now := l.now()
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.last[r].IsZero() && now.Sub(l.last[r]) < l.every {
		l.suppressed[r]++
		return false, 0
	}
	suppressed, l.suppressed[r], l.last[r] = l.suppressed[r], 0, now
	return true, suppressed
}

// refused counts a connection turned away before its node registered,
// for reason r, and logs it if the reason's log limit lets it: with the
// reason, and how many like it went unlogged since the last line. log
// carries the remote address.
func (g *Gateway) refused(log *slog.Logger, level slog.Level, r reason, msg string, args ...any) {
	g.refusals[r].Add(1)
	ok, n := g.logLimit.allow(r)
	if !ok {
		return
	}
	args = append(args, "reason", r.String())
	if n > 0 {
		args = append(args, "suppressed", n)
	}
	log.Log(context.Background(), level, msg, args...)
}
