package main

import (
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/nlvpn/nlvpn/policy"
)

// reloadOnHUP reads the policy file again on every SIGHUP and puts it in
// force; a file that does not parse leaves the policy in force as it was
// (and says so), so a typo never opens or closes everything. New flows
// follow the new rules; flows already open stay.
func reloadOnHUP(path string, cur *policy.Current) (stop func()) {
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	done := make(chan struct{})
	go func() {
		for {
			select {
			case <-done:
				return
			case <-hup:
				p, err := policy.Load(path)
				if err != nil {
					slog.Error("policy not reloaded; the previous one stays in force", "file", path, "err", err)
					continue
				}
				cur.Store(p)
				slog.Info("policy reloaded", "file", path, "rules", len(p.Rules))
			}
		}
	}()
	return func() {
		signal.Stop(hup)
		close(done)
	}
}
