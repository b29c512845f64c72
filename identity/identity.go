// Package identity holds a node's long-term key pair and the TLS
// certificates and pins derived from it.
//
// Every node (gateway, agent, client) has one Ed25519 key in its state
// directory, made on first run and stored 0600. The key signs a self-signed
// certificate that the node presents in every QUIC handshake, so a peer can
// authenticate it by public key alone, without any CA.
package identity

import (
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// Key is a node's long-term Ed25519 key pair.
type Key struct {
	priv ed25519.PrivateKey
}

// Generate makes a new random key.
func Generate() (*Key, error) {
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, err
	}
	return &Key{priv: priv}, nil
}

// LoadOrCreate reads the key in path, or makes one and writes it there with
// mode 0600 (and its directory 0700) when the file does not exist. A key file
// that other users can read is refused: it would let them impersonate the node.
func LoadOrCreate(path string) (*Key, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		k, err := Generate()
		if err != nil {
			return nil, err
		}
		if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
			return nil, fmt.Errorf("create state directory: %w", err)
		}
		der, err := x509.MarshalPKCS8PrivateKey(k.priv)
		if err != nil {
			return nil, err
		}
		data := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
		if err := WriteFileAtomic(path, data, 0o600); err != nil {
			return nil, fmt.Errorf("write key: %w", err)
		}
		return k, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read key: %w", err)
	}
	if fi, err := os.Stat(path); err == nil && fi.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("key file %s is readable by other users (mode %v); run chmod 600 %s", path, fi.Mode().Perm(), path)
	}
	k, err := ParsePEM(b)
	if err != nil {
		return nil, fmt.Errorf("key file %s: %w", path, err)
	}
	return k, nil
}

// ParsePEM parses a PKCS#8 PEM Ed25519 private key.
func ParsePEM(b []byte) (*Key, error) {
	blk, _ := pem.Decode(b)
	if blk == nil {
		return nil, errors.New("no PEM block")
	}
	pk, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
	if err != nil {
		return nil, err
	}
	priv, ok := pk.(ed25519.PrivateKey)
	if !ok {
		return nil, errors.New("not an Ed25519 key")
	}
	return &Key{priv: priv}, nil
}

// Public returns the public key.
func (k *Key) Public() PublicKey { return PublicKey(k.priv.Public().(ed25519.PublicKey)) }

// Sign signs msg.
func (k *Key) Sign(msg []byte) []byte { return ed25519.Sign(k.priv, msg) }

// Signer exposes the key as a crypto.Signer.
func (k *Key) Signer() crypto.Signer { return k.priv }

// Certificate returns a self-signed TLS certificate for the key. Peers never
// check its names or dates; they check the key inside it.
func (k *Key) Certificate() (tls.Certificate, error) {
	return SelfSigned(k.priv, "nlvpn-node")
}

// SelfSigned makes a self-signed certificate for any crypto.Signer, valid for
// ten years and for the given DNS name (and any IP, since peers pin the key).
func SelfSigned(signer crypto.Signer, name string) (tls.Certificate, error) {
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		return tls.Certificate{}, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: name},
		DNSNames:     []string{name},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().AddDate(10, 0, 0),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, signer.Public(), signer)
	if err != nil {
		return tls.Certificate{}, err
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: signer, Leaf: leaf}, nil
}

// PublicKey is an Ed25519 public key. Its text form is "ed25519:" + base64url.
type PublicKey []byte

func (p PublicKey) String() string {
	return "ed25519:" + base64.RawURLEncoding.EncodeToString(p)
}

// Equal reports whether two keys are the same.
func (p PublicKey) Equal(q PublicKey) bool {
	return len(p) == ed25519.PublicKeySize && ed25519.PublicKey(p).Equal(ed25519.PublicKey(q))
}

// Verify checks sig over msg.
func (p PublicKey) Verify(msg, sig []byte) bool {
	return len(p) == ed25519.PublicKeySize && ed25519.Verify(ed25519.PublicKey(p), msg, sig)
}

// ParsePublicKey parses the String form.
func ParsePublicKey(s string) (PublicKey, error) {
	rest, ok := strings.CutPrefix(s, "ed25519:")
	if !ok {
		return nil, fmt.Errorf("public key %q: want prefix ed25519:", s)
	}
	b, err := base64.RawURLEncoding.DecodeString(rest)
	if err != nil || len(b) != ed25519.PublicKeySize {
		return nil, fmt.Errorf("public key %q: not a base64url Ed25519 key", s)
	}
	return PublicKey(b), nil
}

// MarshalText implements encoding.TextMarshaler.
func (p PublicKey) MarshalText() ([]byte, error) { return []byte(p.String()), nil }

// UnmarshalText implements encoding.TextUnmarshaler.
func (p *PublicKey) UnmarshalText(b []byte) error {
	k, err := ParsePublicKey(string(b))
	if err != nil {
		return err
	}
	*p = k
	return nil
}

// PeerKey extracts the Ed25519 key from the single self-signed certificate a
// peer presented, checking that the certificate is signed by that key
// (proof that the peer holds it, on top of the TLS handshake signature).
func PeerKey(rawCerts [][]byte) (PublicKey, error) {
	if len(rawCerts) != 1 {
		return nil, fmt.Errorf("peer sent %d certificates, want 1", len(rawCerts))
	}
	cert, err := x509.ParseCertificate(rawCerts[0])
	if err != nil {
		return nil, fmt.Errorf("peer certificate: %w", err)
	}
	pub, ok := cert.PublicKey.(ed25519.PublicKey)
	if !ok {
		return nil, errors.New("peer certificate does not hold an Ed25519 key")
	}
	if err := cert.CheckSignature(cert.SignatureAlgorithm, cert.RawTBSCertificate, cert.Signature); err != nil {
		return nil, fmt.Errorf("peer certificate is not self-signed by its key: %w", err)
	}
	return PublicKey(pub), nil
}

// ServerTLS is a TLS 1.3 server configuration presenting cert that requires
// the client to present a node certificate (an Ed25519 key, self-signed);
// the caller reads the key with KeyOf and decides whether it is welcome.
func ServerTLS(cert tls.Certificate, alpn string) *tls.Config {
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
		NextProtos:   []string{alpn},
		ClientAuth:   tls.RequireAnyClientCert,
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			_, err := PeerKey(raw)
			return err
		},
	}
}

// KeyOf returns the key the peer of a completed TLS handshake proved it
// holds: the one in its single self-signed certificate.
func KeyOf(st tls.ConnectionState) (PublicKey, error) {
	if len(st.PeerCertificates) != 1 {
		return nil, errors.New("peer presented no certificate")
	}
	return PeerKey([][]byte{st.PeerCertificates[0].Raw})
}

// Fingerprint is the pin of a certificate: SHA-256 over its
// SubjectPublicKeyInfo, hex. Pinning the key rather than the whole
// certificate lets a gateway renew its certificate without new tokens.
func Fingerprint(cert *x509.Certificate) string {
	sum := sha256.Sum256(cert.RawSubjectPublicKeyInfo)
	return "sha256:" + hex.EncodeToString(sum[:])
}

// VerifyPin returns a tls.Config.VerifyPeerCertificate function that accepts
// exactly the leaf certificate whose Fingerprint is pin.
func VerifyPin(pin string) func([][]byte, [][]*x509.Certificate) error {
	return func(raw [][]byte, _ [][]*x509.Certificate) error {
		if len(raw) == 0 {
			return errors.New("gateway sent no certificate")
		}
		cert, err := x509.ParseCertificate(raw[0])
		if err != nil {
			return fmt.Errorf("gateway certificate: %w", err)
		}
		if got := Fingerprint(cert); got != pin {
			return fmt.Errorf("gateway certificate pin mismatch: got %s, token expects %s", got, pin)
		}
		return nil
	}
}

// WriteFileAtomic writes data to path through a temporary file and a rename,
// so a crash never leaves a half-written key or config.
func WriteFileAtomic(path string, data []byte, perm os.FileMode) error {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp)
	if err := f.Chmod(perm); err != nil {
		f.Close()
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// Seed returns the key's 32-byte private seed, from which FromSeed makes
// the same key again. It is as secret as the key.
func (k *Key) Seed() []byte { return k.priv.Seed() }

// FromSeed makes the key whose Seed is seed.
func FromSeed(seed []byte) (*Key, error) {
	if len(seed) != ed25519.SeedSize {
		return nil, fmt.Errorf("key seed is %d bytes, want %d", len(seed), ed25519.SeedSize)
	}
	return &Key{priv: ed25519.NewKeyFromSeed(seed)}, nil
}
