// Package status is a running node's local status socket: a unix socket,
// readable only by the node's user, that answers each connection with one
// JSON document (`nlvpn status` reads it).
package status

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"time"
)

// Serve answers each connection on a unix socket at path with the JSON of
// now(). The socket is 0600 (in a 0700 state directory). A stale socket
// left by a killed process is replaced; a live one means another instance
// runs with this state directory, which is an error.
func Serve(path string, now func() any) (stop func(), err error) {
	if fi, err := os.Lstat(path); err == nil && fi.Mode()&os.ModeSocket != 0 {
		// A stale socket from a run that was killed; a live one would answer.
		if conn, err := net.Dial("unix", path); err == nil {
			conn.Close()
			return nil, errors.New("another nlvpn is already running with this state directory (" + path + ")")
		}
		os.Remove(path)
	}
	old := umask(0o177)
	ln, err := net.Listen("unix", path)
	umask(old)
	if err != nil {
		return nil, err
	}
	os.Chmod(path, 0o600)
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			conn.SetWriteDeadline(time.Now().Add(2 * time.Second))
			json.NewEncoder(conn).Encode(now())
			conn.Close()
		}
	}()
	return func() { ln.Close(); os.Remove(path) }, nil
}

// Read fetches the JSON document served at path.
func Read(path string) (json.RawMessage, error) {
	conn, err := net.DialTimeout("unix", path, 2*time.Second)
	if err != nil {
		return nil, fmt.Errorf("no running nlvpn found (%s): is `nlvpn up` or `nlvpn agent` running with this --state-dir?", path)
	}
	defer conn.Close()
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	var raw json.RawMessage
	if err := json.NewDecoder(conn).Decode(&raw); err != nil {
		return nil, fmt.Errorf("reading status: %w", err)
	}
	return raw, nil
}
