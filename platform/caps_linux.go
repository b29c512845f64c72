package platform

import (
	"bufio"
	"os"
	"strconv"
	"strings"
)

const capNetAdmin = 12

// CanCreateTUN reports whether this process may create a TUN device and
// set routes (CAP_NET_ADMIN and /dev/net/tun), and if not, why.
func CanCreateTUN() (bool, string) {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		return false, "cannot read /proc/self/status"
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		v, ok := strings.CutPrefix(sc.Text(), "CapEff:")
		if !ok {
			continue
		}
		caps, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
		if err != nil || caps&(1<<capNetAdmin) == 0 {
			return false, "no CAP_NET_ADMIN (not root)"
		}
		if _, err := os.Stat("/dev/net/tun"); err != nil {
			return false, "no /dev/net/tun"
		}
		return true, ""
	}
	return false, "no capability information"
}
