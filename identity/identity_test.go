package identity

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func mustKey(t testing.TB) *Key {
	t.Helper()
	k, err := Generate()
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func TestLoadOrCreate(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state", "nested")
	path := filepath.Join(dir, "node.key")

	k1, err := LoadOrCreate(path)
	if err != nil {
		t.Fatalf("first LoadOrCreate: %v", err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if got := fi.Mode().Perm(); got != 0o600 {
		t.Errorf("key file mode = %v, want 0600", got)
	}
	di, err := os.Stat(dir)
	if err != nil {
		t.Fatal(err)
	}
	if got := di.Mode().Perm(); got != 0o700 {
		t.Errorf("state dir mode = %v, want 0700", got)
	}
	// No temporary files left behind by the atomic write.
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(ents) != 1 {
		var names []string
		for _, e := range ents {
			names = append(names, e.Name())
		}
		t.Errorf("state dir holds %v, want only node.key", names)
	}

	k2, err := LoadOrCreate(path)
	if err != nil {
		t.Fatalf("second LoadOrCreate: %v", err)
	}
	if !k1.Public().Equal(k2.Public()) {
		t.Fatalf("second load returned a different key: %s vs %s", k2.Public(), k1.Public())
	}
	// The loaded key signs what the first one verifies.
	msg := []byte("same key")
	if !k1.Public().Verify(msg, k2.Sign(msg)) {
		t.Fatal("loaded private key does not match the created one")
	}
}

func TestLoadOrCreateRefusesReadableKey(t *testing.T) {
	for _, mode := range []os.FileMode{0o644, 0o640, 0o604} {
		t.Run(mode.String(), func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "node.key")
			if _, err := LoadOrCreate(path); err != nil {
				t.Fatal(err)
			}
			before, _ := os.ReadFile(path)
			if err := os.Chmod(path, mode); err != nil {
				t.Fatal(err)
			}
			_, err := LoadOrCreate(path)
			if err == nil {
				t.Fatalf("key file with mode %v was accepted", mode)
			}
			for _, want := range []string{"readable by other users", "chmod 600", path} {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error %q does not mention %q", err, want)
				}
			}
			// Refusing must not replace the key.
			after, _ := os.ReadFile(path)
			if !bytes.Equal(before, after) {
				t.Error("refused key file was rewritten")
			}
		})
	}
}

func TestLoadOrCreateBadFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "node.key")
	if err := os.WriteFile(path, []byte("not a key"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := LoadOrCreate(path)
	if err == nil || !strings.Contains(err.Error(), path) {
		t.Fatalf("garbage key file: err = %v, want an error naming the file", err)
	}
	if b, _ := os.ReadFile(path); string(b) != "not a key" {
		t.Fatal("garbage key file was overwritten")
	}
}

// certSignedBy makes a certificate holding pub but signed by signer.
func certSignedBy(t *testing.T, pub crypto.PublicKey, signer crypto.Signer) []byte {
	t.Helper()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(7),
		Subject:      pkix.Name{CommonName: "nlvpn-node"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, pub, signer)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

func TestPeerKey(t *testing.T) {
	k := mustKey(t)
	other := mustKey(t)
	cert, err := k.Certificate()
	if err != nil {
		t.Fatal(err)
	}
	own := cert.Certificate[0]

	got, err := PeerKey([][]byte{own})
	if err != nil {
		t.Fatalf("PeerKey(own certificate): %v", err)
	}
	if !got.Equal(k.Public()) {
		t.Fatalf("PeerKey = %s, want %s", got, k.Public())
	}

	ec, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	ecCert, err := SelfSigned(ec, "nlvpn-node")
	if err != nil {
		t.Fatal(err)
	}
	otherCert, _ := other.Certificate()

	tests := []struct {
		name string
		raw  [][]byte
		want string
	}{
		{"no certificate", nil, "0 certificates"},
		{"two certificates", [][]byte{own, otherCert.Certificate[0]}, "2 certificates"},
		{"garbage DER", [][]byte{[]byte("\x30\x03garbage")}, "peer certificate"},
		{"empty DER", [][]byte{{}}, "peer certificate"},
		{"not self-signed", [][]byte{certSignedBy(t, ed25519.PublicKey(k.Public()), other.Signer())}, "not self-signed"},
		{"ECDSA key", [][]byte{ecCert.Certificate[0]}, "Ed25519"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			pk, err := PeerKey(tt.raw)
			if err == nil {
				t.Fatalf("accepted, key %s", pk)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %q, want containing %q", err, tt.want)
			}
		})
	}
}

func TestFingerprint(t *testing.T) {
	k := mustKey(t)
	c1, err := SelfSigned(k.Signer(), "nlvpn-gateway")
	if err != nil {
		t.Fatal(err)
	}
	c2, err := SelfSigned(k.Signer(), "another-name")
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(c1.Certificate[0], c2.Certificate[0]) {
		t.Fatal("two certificates are identical; the test proves nothing")
	}
	f1, f2 := Fingerprint(c1.Leaf), Fingerprint(c2.Leaf)
	if f1 != f2 {
		t.Fatalf("fingerprint changed with the certificate for the same key: %s vs %s", f1, f2)
	}
	if !strings.HasPrefix(f1, "sha256:") || len(f1) != len("sha256:")+64 {
		t.Fatalf("fingerprint %q is not sha256:<64 hex>", f1)
	}
	c3, err := SelfSigned(mustKey(t).Signer(), "nlvpn-gateway")
	if err != nil {
		t.Fatal(err)
	}
	if f3 := Fingerprint(c3.Leaf); f3 == f1 {
		t.Fatal("different keys have the same fingerprint")
	}
}

func TestVerifyPin(t *testing.T) {
	k := mustKey(t)
	cert, _ := SelfSigned(k.Signer(), "nlvpn-gateway")
	renewed, _ := SelfSigned(k.Signer(), "nlvpn-gateway")
	other, _ := SelfSigned(mustKey(t).Signer(), "nlvpn-gateway")
	verify := VerifyPin(Fingerprint(cert.Leaf))

	if err := verify([][]byte{cert.Certificate[0]}, nil); err != nil {
		t.Fatalf("right certificate refused: %v", err)
	}
	if err := verify([][]byte{renewed.Certificate[0]}, nil); err != nil {
		t.Fatalf("renewed certificate for the pinned key refused: %v", err)
	}
	tests := []struct {
		name string
		raw  [][]byte
		want string
	}{
		{"other key", [][]byte{other.Certificate[0]}, "pin mismatch"},
		{"no certificate", nil, "no certificate"},
		{"garbage", [][]byte{[]byte("junk")}, "gateway certificate"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := verify(tt.raw, nil)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want containing %q", err, tt.want)
			}
		})
	}
}

func TestParsePublicKey(t *testing.T) {
	k := mustKey(t)
	s := k.Public().String()
	if !strings.HasPrefix(s, "ed25519:") {
		t.Fatalf("String() = %q, want ed25519: prefix", s)
	}
	got, err := ParsePublicKey(s)
	if err != nil {
		t.Fatalf("ParsePublicKey(%q): %v", s, err)
	}
	if !got.Equal(k.Public()) {
		t.Fatalf("round trip changed the key: %s -> %s", s, got)
	}
	// Text marshaling goes through the same form.
	txt, _ := k.Public().MarshalText()
	var u PublicKey
	if err := u.UnmarshalText(txt); err != nil || !u.Equal(k.Public()) {
		t.Fatalf("UnmarshalText(MarshalText()) = %s, %v", u, err)
	}

	rest := strings.TrimPrefix(s, "ed25519:")
	bad := []struct{ name, in string }{
		{"empty", ""},
		{"no prefix", rest},
		{"wrong prefix", "ecdsa:" + rest},
		{"prefix only", "ed25519:"},
		{"too short", "ed25519:" + rest[:len(rest)-4]},
		{"too long", "ed25519:" + rest + "AAAA"},
		{"std base64", "ed25519:" + rest + "="},
		{"bad chars", "ed25519:" + strings.Repeat("!", len(rest))},
		{"upper prefix", "ED25519:" + rest},
	}
	for _, tt := range bad {
		t.Run(tt.name, func(t *testing.T) {
			if pk, err := ParsePublicKey(tt.in); err == nil {
				t.Fatalf("ParsePublicKey(%q) accepted: %s", tt.in, pk)
			}
			var u PublicKey
			if err := u.UnmarshalText([]byte(tt.in)); err == nil {
				t.Fatalf("UnmarshalText(%q) accepted", tt.in)
			}
		})
	}
}

func TestPublicKeyEqualRejectsShortKeys(t *testing.T) {
	var empty PublicKey
	if empty.Equal(empty) {
		t.Fatal("an empty key equals itself: it must never match")
	}
	if empty.Verify([]byte("m"), make([]byte, ed25519.SignatureSize)) {
		t.Fatal("an empty key verified a signature")
	}
}

func FuzzParsePublicKey(f *testing.F) {
	k, err := Generate()
	if err != nil {
		f.Fatal(err)
	}
	f.Add(k.Public().String())
	f.Add("ed25519:")
	f.Add("ed25519:AAAA")
	f.Add("")
	f.Fuzz(func(t *testing.T, s string) {
		pk, err := ParsePublicKey(s)
		if err != nil {
			return
		}
		if len(pk) != ed25519.PublicKeySize {
			t.Fatalf("ParsePublicKey(%q) returned a %d-byte key", s, len(pk))
		}
		if got := pk.String(); got != s {
			// Raw base64url is canonical only if the decoder is strict;
			// a key that parses must print back as the same text.
			t2, err := ParsePublicKey(got)
			if err != nil || !t2.Equal(pk) {
				t.Fatalf("re-parse of %q (from %q) failed: %v", got, s, err)
			}
		}
	})
}
