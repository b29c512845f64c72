package punch

import (
	"bytes"
	"encoding/base64"
	"testing"

	"github.com/nlvpn/nlvpn/identity"
)

func mustKey(t testing.TB) *identity.Key {
	t.Helper()
	k, err := identity.Generate()
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func mustOffer(t testing.TB, k *identity.Key) *Offer {
	t.Helper()
	o, err := NewOffer(k)
	if err != nil {
		t.Fatal(err)
	}
	return o
}

func TestKeyBothSidesAgree(t *testing.T) {
	ka, kb := mustKey(t), mustKey(t)
	oa, ob := mustOffer(t, ka), mustOffer(t, kb)

	a1, err := oa.Key(42, kb.Public(), ob.Pub, ob.Sig)
	if err != nil {
		t.Fatalf("a derives: %v", err)
	}
	b1, err := ob.Key(42, ka.Public(), oa.Pub, oa.Sig)
	if err != nil {
		t.Fatalf("b derives: %v", err)
	}
	if len(a1) != 32 {
		t.Fatalf("key is %d bytes, want 32", len(a1))
	}
	if !bytes.Equal(a1, b1) {
		t.Fatal("the two nodes derived different keys for the same session")
	}

	a2, err := oa.Key(43, kb.Public(), ob.Pub, ob.Sig)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(a1, a2) {
		t.Fatal("sessions 42 and 43 got the same key")
	}

	// A third node's offer gives a different key, even for the same session.
	kc := mustKey(t)
	oc := mustOffer(t, kc)
	a3, err := oa.Key(42, kc.Public(), oc.Pub, oc.Sig)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(a1, a3) {
		t.Fatal("different peers gave the same key")
	}
}

func TestKeyRejectsBadPeerHalf(t *testing.T) {
	ka, kb, evil := mustKey(t), mustKey(t), mustKey(t)
	oa, ob := mustOffer(t, ka), mustOffer(t, kb)
	oevil := mustOffer(t, evil)

	pub, _ := base64.RawURLEncoding.DecodeString(ob.Pub)
	pub[0] ^= 1
	tamperedPub := base64.RawURLEncoding.EncodeToString(pub)
	sig, _ := base64.RawURLEncoding.DecodeString(ob.Sig)
	sig[5] ^= 0x80
	tamperedSig := base64.RawURLEncoding.EncodeToString(sig)

	for _, tc := range []struct {
		name     string
		node     identity.PublicKey
		pub, sig string
	}{
		// The gateway (or anyone) swaps in its own signed half: the signature
		// does not verify under b's node key.
		{"half signed by another node", kb.Public(), oevil.Pub, oevil.Sig},
		{"right half, checked against wrong node", evil.Public(), ob.Pub, ob.Sig},
		{"tampered pub", kb.Public(), tamperedPub, ob.Sig},
		{"tampered sig", kb.Public(), ob.Pub, tamperedSig},
		{"pub not base64", kb.Public(), "!!!not-base64!!!", ob.Sig},
		{"sig not base64", kb.Public(), ob.Pub, "***"},
		{"empty", kb.Public(), "", ""},
		{"no node key", nil, ob.Pub, ob.Sig},
		{"short pub signed", kb.Public(), base64.RawURLEncoding.EncodeToString([]byte("short")), ob.Sig},
	} {
		t.Run(tc.name, func(t *testing.T) {
			k, err := oa.Key(7, tc.node, tc.pub, tc.sig)
			if err == nil {
				t.Fatalf("accepted a bad peer half, derived key %x", k)
			}
			if k != nil {
				t.Fatalf("returned a key with the error: %x", k)
			}
		})
	}
}

func TestOfferIsFreshEachTime(t *testing.T) {
	k := mustKey(t)
	o1, o2 := mustOffer(t, k), mustOffer(t, k)
	if o1.Pub == o2.Pub {
		t.Fatal("two offers share an ephemeral key")
	}
	if !k.Public().Verify(append([]byte(sigLabel), mustDecode(t, o1.Pub)...), mustDecode(t, o1.Sig)) {
		t.Fatal("offer's signature does not verify under the node key")
	}
}

func mustDecode(t *testing.T, s string) []byte {
	t.Helper()
	b, err := base64.RawURLEncoding.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
