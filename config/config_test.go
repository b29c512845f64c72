package config

import (
	"path/filepath"
	"strings"
	"testing"
)

func TestParse(t *testing.T) {
	f, err := Parse([]byte("# comment\n\ntoken = nlv1.a.b\n  gateway=198.18.1.2:4433  \n"))
	if err != nil {
		t.Fatal(err)
	}
	if f["token"] != "nlv1.a.b" || f["gateway"] != "198.18.1.2:4433" {
		t.Fatalf("got %v", f)
	}
	for _, bad := range []string{"tokn = x", "token", "= x", strings.Repeat("x", MaxSize+1)} {
		if _, err := Parse([]byte(bad)); err == nil {
			t.Errorf("Parse(%.20q) accepted", bad)
		}
	}
}

func TestSaveLoad(t *testing.T) {
	p := filepath.Join(t.TempDir(), "config")
	if f, err := Load(p); err != nil || len(f) != 0 {
		t.Fatalf("missing file: %v %v", f, err)
	}
	want := File{"token": "nlv1.x.y", "gateway": "gw:1"}
	if err := want.Save(p); err != nil {
		t.Fatal(err)
	}
	got, err := Load(p)
	if err != nil || got["token"] != want["token"] || got["gateway"] != want["gateway"] {
		t.Fatalf("round trip: %v %v", got, err)
	}
}

func FuzzParse(f *testing.F) {
	f.Add([]byte("token = a\ngateway = b\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		got, err := Parse(b)
		if err != nil {
			return
		}
		for k := range got {
			if !Keys[k] {
				t.Fatalf("unknown key %q accepted", k)
			}
		}
	})
}
