package platform

import (
	"slices"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// The nftables pieces the inbound filter and the forwarding share.

// replaceTable queues table t's creation in one batch with the removal of
// a stale one of the same name (left by a process that died): add (a
// no-op if it exists), delete, add.
func replaceTable(c *nftables.Conn, t *nftables.Table) {
	c.AddTable(t)
	c.DelTable(t)
	c.AddTable(t)
}

// acceptChain adds a filter chain on hook whose policy is accept: its
// rules drop what they must and leave the rest to the host's own.
func acceptChain(c *nftables.Conn, t *nftables.Table, name string, hook *nftables.ChainHook) *nftables.Chain {
	accept := nftables.ChainPolicyAccept
	return c.AddChain(&nftables.Chain{Name: name, Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: hook, Priority: nftables.ChainPriorityFilter, Policy: &accept})
}

// iifIs matches packets that came in on interface dev.
func iifIs(dev string) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: ifname(dev)},
	}
}

// ctStateIs matches conntrack states in bits; with accept, the rule
// accepts what matched.
func ctStateIs(bits uint32, accept bool) []expr.Any {
	e := []expr.Any{
		&expr.Ct{Register: 1, Key: expr.CtKeySTATE},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(bits),
			Xor:  binaryutil.NativeEndian.PutUint32(0)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(0)},
	}
	if accept {
		e = append(e, &expr.Verdict{Kind: expr.VerdictAccept})
	}
	return e
}

// repliesOnly adds to chain ch: match ct state established,related
// accept; match counter drop. The drop rule carries name (when not empty)
// as its user data, by which its counter is read.
func repliesOnly(c *nftables.Conn, t *nftables.Table, ch *nftables.Chain, match []expr.Any, name string) {
	var userData []byte
	if name != "" {
		userData = []byte(name)
	}
	c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: append(slices.Clip(match),
		ctStateIs(expr.CtStateBitESTABLISHED|expr.CtStateBitRELATED, true)...)})
	c.AddRule(&nftables.Rule{Table: t, Chain: ch, UserData: userData, Exprs: append(slices.Clip(match), countDrop()...)})
}

// countDrop counts what reaches it and drops it.
func countDrop() []expr.Any {
	return []expr.Any{&expr.Counter{}, &expr.Verdict{Kind: expr.VerdictDrop}}
}

// oifIs matches packets that leave through interface dev.
func oifIs(dev string) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyOIFNAME, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: ifname(dev)},
	}
}

// ifname is dev as nftables compares interface names: IFNAMSIZ bytes.
func ifname(dev string) []byte {
	b := make([]byte, unix.IFNAMSIZ)
	copy(b, dev)
	return b
}
