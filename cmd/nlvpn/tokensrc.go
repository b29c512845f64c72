package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"

	"github.com/urfave/cli/v2"
)

// maxTokenLen bounds what is read from a token file or standard input: a
// token is a few hundred bytes, and a wrong path (a disk image, /dev/zero)
// must fail quickly rather than fill memory.
const maxTokenLen = 16 << 10

// tokenSource says where a node's token came from, for messages.
type tokenSource string

const (
	tokenFromArgv   tokenSource = "--token"
	tokenFromStdin  tokenSource = "standard input"
	tokenFromFile   tokenSource = "--token-file"
	tokenFromEnv    tokenSource = "NLVPN_TOKEN"
	tokenFromConfig tokenSource = "the config file"
)

// argvTokenWarning is printed when the token is given on the command line.
const argvTokenWarning = "the token is on the command line, where every user of this machine can read it " +
	"(/proc/PID/cmdline, ps) and your shell may keep it in its history; " +
	"use --token-file FILE, --token - (standard input) or NLVPN_TOKEN instead"

// readToken finds the node's token: --token or --token-file (one of them),
// then NLVPN_TOKEN, then the config file's keys, in order. stdin is read for
// "--token -", unless the command uses standard input for something else.
// A token in argv works, with a warning that says why it should not be there.
func readToken(c *cli.Context, stdin io.Reader, stdinBusy bool, file map[string]string, keys ...string) (string, tokenSource, error) {
	arg, path := c.String("token"), c.String("token-file")
	switch {
	case c.IsSet("token") && c.IsSet("token-file"):
		return "", "", errors.New("give the token once: --token or --token-file, not both")
	case c.IsSet("token-file"):
		tok, err := tokenFromPath(path)
		return tok, tokenFromFile, err
	case c.IsSet("token") && arg == "-":
		if stdinBusy {
			return "", "", fmt.Errorf("`nlvpn %s` carries the connection on standard input, so it cannot read the token there: use --token-file FILE or NLVPN_TOKEN", c.Command.Name)
		}
		tok, err := firstLine(stdin)
		if err != nil {
			return "", "", fmt.Errorf("reading the token from standard input: %w", err)
		}
		return tok, tokenFromStdin, nil
	case c.IsSet("token"):
		if arg == "" {
			return "", "", errors.New("--token is empty")
		}
		slog.Warn(argvTokenWarning)
		return strings.TrimSpace(arg), tokenFromArgv, nil
	}
	if v := strings.TrimSpace(os.Getenv("NLVPN_TOKEN")); v != "" {
		return v, tokenFromEnv, nil
	}
	for _, k := range keys {
		if v := file[k]; v != "" {
			return v, tokenFromConfig, nil
		}
	}
	return "", "", nil
}

// tokenFromPath reads a token file. One readable by other users works, with
// a warning: it is their secret to take.
func tokenFromPath(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("--token-file: %w", err)
	}
	defer f.Close()
	if st, err := f.Stat(); err == nil {
		if !st.Mode().IsRegular() && st.Mode()&os.ModeNamedPipe == 0 {
			return "", fmt.Errorf("--token-file %s: not a regular file", path)
		}
		if st.Mode().IsRegular() && st.Mode().Perm()&0o077 != 0 {
			slog.Warn("the token file can be read by other users of this machine", "file", path,
				"mode", fmt.Sprintf("%#o", st.Mode().Perm()), "fix", "chmod 600 "+path)
		}
	}
	tok, err := firstLine(f)
	if err != nil {
		return "", fmt.Errorf("--token-file %s: %w", path, err)
	}
	return tok, nil
}

// firstLine returns the first non-empty line of r, trimmed, reading at most
// maxTokenLen bytes.
func firstLine(r io.Reader) (string, error) {
	sc := bufio.NewScanner(io.LimitReader(r, maxTokenLen+1))
	sc.Buffer(make([]byte, 0, 1024), maxTokenLen)
	for sc.Scan() {
		if line := strings.TrimSpace(sc.Text()); line != "" {
			return line, nil
		}
	}
	if err := sc.Err(); err != nil {
		if errors.Is(err, bufio.ErrTooLong) {
			return "", fmt.Errorf("longer than %d bytes: not a token", maxTokenLen)
		}
		return "", err
	}
	return "", errors.New("no token in it (empty)")
}

// writeTokenFile creates path, readable only by its owner, with tok in it.
// An existing file is left alone: it may be another node's token.
func writeTokenFile(path, tok string) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("--out: %w", err)
	}
	if _, err := f.WriteString(tok + "\n"); err != nil {
		f.Close()
		os.Remove(path)
		return fmt.Errorf("--out: %w", err)
	}
	if err := f.Close(); err != nil {
		os.Remove(path)
		return fmt.Errorf("--out: %w", err)
	}
	return nil
}
