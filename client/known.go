package client

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/nlvpn/nlvpn/identity"
)

var knownMu sync.Mutex

// checkKnownAgent pins an agent's key on first use, like ssh's known_hosts:
// the first key the gateway vouches for is written down; a different key
// later is a hard error, so even a compromised gateway cannot slip in its
// own agent unnoticed. Lines are "<gateway pin> <agent name> <agent key>".
func checkKnownAgent(path, gwPin, agent string, key identity.PublicKey) error {
	if path == "" {
		return nil
	}
	knownMu.Lock()
	defer knownMu.Unlock()
	f, err := os.Open(path)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	if f != nil {
		sc := bufio.NewScanner(f)
		line := 0
		for sc.Scan() {
			line++
			fs := strings.Fields(sc.Text())
			if len(fs) != 3 || fs[0] != gwPin || fs[1] != agent {
				continue
			}
			if fs[2] != key.String() {
				f.Close()
				return fmt.Errorf("agent %q presented key %s, but %s:%d pins %s: the agent was re-installed, or someone is impersonating it. If you know the key changed legitimately, delete that line", agent, key, path, line, fs[2])
			}
			f.Close()
			return nil
		}
		f.Close()
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	af, err := os.OpenFile(path, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	defer af.Close()
	_, err = fmt.Fprintf(af, "%s %s %s\n", gwPin, agent, key)
	return err
}
