package main

import (
	"fmt"
	"runtime"
	"runtime/debug"
	"strings"

	"github.com/urfave/cli/v2"
)

// buildVersion describes this binary from what the Go toolchain embeds in
// it: the module version (a tag or pseudo-version for `go install
// ...@version`; "(devel)" for a build from a checkout, then version if the
// build set it with -ldflags), the commit and its time, "+dirty" when the
// tree had changes, and the Go version. It is what a bug report should
// quote.
func buildVersion() string {
	v := version
	var rev, at string
	dirty := false
	if bi, ok := debug.ReadBuildInfo(); ok {
		if mv := bi.Main.Version; mv != "" && mv != "(devel)" {
			v = mv
		}
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				rev = s.Value
			case "vcs.time":
				at = s.Value
			case "vcs.modified":
				dirty = s.Value == "true"
			}
		}
	}
	parts := []string{v}
	if rev != "" {
		if len(rev) > 12 {
			rev = rev[:12]
		}
		if dirty {
			rev += "+dirty"
		}
		parts = append(parts, "commit "+rev)
	}
	if at != "" {
		parts = append(parts, at)
	}
	parts = append(parts, runtime.Version(), runtime.GOOS+"/"+runtime.GOARCH)
	return strings.Join(parts, ", ")
}

func versionCmd() *cli.Command {
	return &cli.Command{
		Name:  "version",
		Usage: "print the version, commit and Go version of this binary (quote it in bug reports)",
		Action: func(*cli.Context) error {
			_, err := fmt.Printf("nlvpn %s\n", buildVersion())
			return err
		},
	}
}
