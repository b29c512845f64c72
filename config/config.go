// Package config reads nlvpn's config file: "key = value" lines, '#'
// comments, blank lines ignored. It holds what a user should not have to
// type every time: the token and the gateway address.
package config

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"

	"github.com/nlvpn/nlvpn/identity"
)

// Keys the file may set. agent_token is the agent's own, so that an agent
// and a client sharing a state directory do not overwrite each other's.
var Keys = map[string]bool{"token": true, "agent_token": true, "gateway": true}

// MaxSize bounds the file; a config is a few lines.
const MaxSize = 64 << 10

// File is a parsed config file.
type File map[string]string

// Parse parses the file's text. Unknown keys and malformed lines are errors
// that name the line, so a typo is never silently ignored.
func Parse(b []byte) (File, error) {
	if len(b) > MaxSize {
		return nil, fmt.Errorf("config is %d bytes, more than %d", len(b), MaxSize)
	}
	f := File{}
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 0, 4096), MaxSize)
	n := 0
	for sc.Scan() {
		n++
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			return nil, fmt.Errorf("line %d: want key = value", n)
		}
		k, v = strings.TrimSpace(k), strings.TrimSpace(v)
		if !Keys[k] {
			return nil, fmt.Errorf("line %d: unknown key %q", n, k)
		}
		f[k] = v
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	return f, nil
}

// Load reads path; a missing file is an empty config.
func Load(path string) (File, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return File{}, nil
	}
	if err != nil {
		return nil, err
	}
	f, err := Parse(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return f, nil
}

// Save writes f to path with mode 0600: a token is a secret.
func (f File) Save(path string) error {
	var keys []string
	for k := range f {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	b.WriteString("# nlvpn config, written by nlvpn. Flags and NLVPN_* variables override it.\n")
	for _, k := range keys {
		fmt.Fprintf(&b, "%s = %s\n", k, f[k])
	}
	return identity.WriteFileAtomic(path, []byte(b.String()), 0o600)
}
