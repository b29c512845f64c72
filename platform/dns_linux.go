package platform

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"
)

// Split DNS on Linux goes through systemd-resolved's per-link settings,
// set with resolvectl: the link's DNS server and its routing domains
// ("~office.lan"), and the link is never the default route for other
// names. The settings belong to the link: when the TUN device goes away,
// with the process or after a crash, resolved forgets them by itself;
// ConfigureDNS still reverts the link first, in case a device of the same
// name survived.
var (
	resolvectl     = "resolvectl"
	resolvedRunDir = "/run/systemd/resolve" // made by a running systemd-resolved
	initNetNS      = "/proc/1/ns/net"
)

// ConfigureDNS sets up split DNS for cfg. Without systemd-resolved, or
// outside the system's network namespace (resolved serves that one, and
// would read the device's index as one of its own links there), it
// changes nothing and returns an error wrapping ErrNoSplitDNS that says
// why.
func ConfigureDNS(cfg SplitDNS) (Undo, error) {
	if len(cfg.Domains) == 0 {
		return func() error { return nil }, nil
	}
	if same, err := sameNetNS("/proc/self/ns/net", initNetNS); err == nil && !same {
		return nil, fmt.Errorf("%w: this process is not in the system's network namespace, where systemd-resolved serves", ErrNoSplitDNS)
	}
	if _, err := os.Stat(resolvedRunDir); err != nil {
		return nil, fmt.Errorf("%w: systemd-resolved is not running (no %s)", ErrNoSplitDNS, resolvedRunDir)
	}
	if _, err := exec.LookPath(resolvectl); err != nil {
		return nil, fmt.Errorf("%w: resolvectl not found", ErrNoSplitDNS)
	}
	run(cfg.Interface, "revert") // settings left by a crashed run
	routing := make([]string, len(cfg.Domains))
	for i, d := range cfg.Domains {
		routing[i] = "~" + d
	}
	undo := func() error { return run(cfg.Interface, "revert") }
	for _, args := range [][]string{
		{"dns", cfg.Server.String()},
		append([]string{"domain"}, routing...),
		{"default-route", "false"},
	} {
		if err := run(cfg.Interface, args[0], args[1:]...); err != nil {
			undo()
			return nil, err
		}
	}
	return undo, nil
}

// run runs `resolvectl verb iface args...`, bounded in time.
func run(iface, verb string, args ...string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, resolvectl, append([]string{verb, iface}, args...)...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("resolvectl %s %s: %v: %s", verb, iface, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// sameNetNS reports whether two network namespace files are the same one.
func sameNetNS(a, b string) (bool, error) {
	var sa, sb syscall.Stat_t
	if err := syscall.Stat(a, &sa); err != nil {
		return false, err
	}
	if err := syscall.Stat(b, &sb); err != nil {
		return false, err
	}
	return sa.Dev == sb.Dev && sa.Ino == sb.Ino, nil
}
