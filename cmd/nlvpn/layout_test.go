package main

import (
	"go/parser"
	"go/token"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
)

const modulePath = "github.com/nlvpn/nlvpn"

// moduleImports reads the in-module imports of every package of the module
// (its non-test files, whatever their build tags), keyed by directory
// relative to the module root ("control", "lab/labdns").
func moduleImports(t *testing.T, root string) map[string][]string {
	t.Helper()
	imports := map[string][]string{}
	err := filepath.WalkDir(root, func(path string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			if name := d.Name(); path != root && (name == "third_party" || name == "testdata" || strings.HasPrefix(name, ".")) {
				return filepath.SkipDir
			}
			return nil
		}
		if !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
			return nil
		}
		f, err := parser.ParseFile(token.NewFileSet(), path, nil, parser.ImportsOnly)
		if err != nil {
			return err
		}
		dir, _ := filepath.Rel(root, filepath.Dir(path))
		dir = filepath.ToSlash(dir)
		if _, ok := imports[dir]; !ok {
			imports[dir] = nil
		}
		for _, is := range f.Imports {
			p, _ := strconv.Unquote(is.Path.Value)
			if rest, ok := strings.CutPrefix(p, modulePath+"/"); ok && !slices.Contains(imports[dir], rest) {
				imports[dir] = append(imports[dir], rest)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return imports
}

// reaches returns every in-module package dir imports, directly or not,
// each with the chain that gets there.
func reaches(imports map[string][]string, dir string) map[string]string {
	seen := map[string]string{}
	var walk func(p, chain string)
	walk = func(p, chain string) {
		for _, q := range imports[p] {
			if _, ok := seen[q]; ok {
				continue
			}
			seen[q] = chain + " -> " + q
			walk(q, seen[q])
		}
	}
	walk(dir, dir)
	return seen
}

// The layout the README promises: roles compose mechanisms and mechanisms
// never import roles; a node's connection to the gateway knows nothing of
// the peer session or the gateway's relay hub; punch is pure (no sockets of
// its own). An import that breaks one of these builds and passes every
// other test, so it is checked here.
func TestLayout(t *testing.T) {
	imports := moduleImports(t, filepath.Join("..", ".."))
	roles := []string{"gateway", "agent", "client"}
	for _, r := range roles {
		if _, ok := imports[r]; !ok {
			t.Fatalf("role %s not found among the module's packages", r)
		}
	}
	for dir := range imports {
		if slices.Contains(roles, dir) || strings.HasPrefix(dir, "cmd/") || dir == "lab" || strings.HasPrefix(dir, "lab/") || dir == "e2e" {
			continue
		}
		for q, chain := range reaches(imports, dir) {
			if slices.Contains(roles, q) {
				t.Errorf("mechanism %s imports role %s: %s", dir, q, chain)
			}
		}
	}
	for _, tt := range []struct {
		dir    string
		forbid []string
	}{
		{"control", []string{"session", "relay", "underlay"}},
		{"punch", []string{"underlay", "udpbatch", "platform", "control", "session"}},
		{"wire", []string{"session", "control", "underlay", "relay"}},
	} {
		got := reaches(imports, tt.dir)
		for _, f := range tt.forbid {
			if chain, ok := got[f]; ok {
				t.Errorf("%s must not import %s: %s", tt.dir, f, chain)
			}
		}
	}
}
