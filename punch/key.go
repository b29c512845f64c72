package punch

import (
	"crypto/ecdh"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/nlvpn/nlvpn/identity"
)

// Probes are authenticated with a key only the two nodes know. Each node
// makes an ephemeral X25519 key per session and signs its public half with
// its long-term node key; the gateway passes the signed halves along but,
// holding neither private half, cannot compute the key, and cannot swap in
// its own half without a node's signature. So no third party, the gateway
// included, can forge a probe and steer the path.

const sigLabel = "nlvpn probe key v1\x00"

// Offer is a node's signed ephemeral half.
type Offer struct {
	priv *ecdh.PrivateKey
	Pub  string // base64url X25519 public key
	Sig  string // base64url Ed25519 signature by the node key
}

// NewOffer makes an ephemeral key and signs it with the node key.
func NewOffer(node *identity.Key) (*Offer, error) {
	priv, err := ecdh.X25519().GenerateKey(rand.Reader)
	if err != nil {
		return nil, err
	}
	pub := priv.PublicKey().Bytes()
	sig := node.Sign(append([]byte(sigLabel), pub...))
	return &Offer{priv: priv, Pub: base64.RawURLEncoding.EncodeToString(pub), Sig: base64.RawURLEncoding.EncodeToString(sig)}, nil
}

// Key derives the probe key for session id from the peer's signed half,
// after checking the peer's node key signed it.
func (o *Offer) Key(id uint64, peerNode identity.PublicKey, peerPub, peerSig string) ([]byte, error) {
	pub, err := base64.RawURLEncoding.DecodeString(peerPub)
	if err != nil {
		return nil, errors.New("peer probe key is not base64url")
	}
	sig, err := base64.RawURLEncoding.DecodeString(peerSig)
	if err != nil {
		return nil, errors.New("peer probe signature is not base64url")
	}
	if !peerNode.Verify(append([]byte(sigLabel), pub...), sig) {
		return nil, fmt.Errorf("peer probe key is not signed by %s", peerNode)
	}
	pk, err := ecdh.X25519().NewPublicKey(pub)
	if err != nil {
		return nil, err
	}
	shared, err := o.priv.ECDH(pk)
	if err != nil {
		return nil, err
	}
	h := sha256.New()
	h.Write([]byte("nlvpn probe mac v1"))
	h.Write(shared)
	h.Write(binary.BigEndian.AppendUint64(nil, id))
	return h.Sum(nil), nil
}
