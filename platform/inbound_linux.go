package platform

import (
	"errors"
	"fmt"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// InboundFilter keeps what arrives through a TUN device to replies: only
// packets of connections this machine started (conntrack "established" or
// "related", so ICMP errors about them too) are accepted from the device,
// on the input and forward hooks; everything else from it is dropped and
// counted. The rules live in one nftables table of their own, named for the
// device, which Remove deletes by that name.
//
// This is the kernel's connection tracking doing a firewall's job: it
// knows TCP's states and ICMP's relations, and costs nothing per packet in
// our process. We speak to nftables over netlink (github.com/google/nftables),
// so no nft binary is needed on the machine.
type InboundFilter struct {
	table *nftables.Table
	in    *nftables.Chain
	fwd   *nftables.Chain
}

// inboundTableName is the filter's table for TUN device dev.
func inboundTableName(dev string) string { return "nlvpn-inbound-" + dev }

// NewInboundFilter installs the filter for TUN device dev. A table of the
// same name left by a process that died is replaced.
func NewInboundFilter(dev string) (*InboundFilter, error) {
	if dev == "" || len(dev) >= unix.IFNAMSIZ {
		return nil, fmt.Errorf("inbound filter: bad device name %q", dev)
	}
	c, err := nftables.New()
	if err != nil {
		return nil, fmt.Errorf("inbound filter: nftables: %w", err)
	}
	f := &InboundFilter{table: &nftables.Table{Name: inboundTableName(dev), Family: nftables.TableFamilyINet}}
	replaceTable(c, f.table)
	f.in = acceptChain(c, f.table, "input", nftables.ChainHookInput)
	f.fwd = acceptChain(c, f.table, "forward", nftables.ChainHookForward)
	for _, ch := range []*nftables.Chain{f.in, f.fwd} {
		// iifname dev ct state established,related accept; iifname dev counter drop
		repliesOnly(c, f.table, ch, iifIs(dev), "")
	}
	if err := c.Flush(); err != nil {
		return nil, fmt.Errorf("inbound filter: installing nftables table %s: %w", f.table.Name, err)
	}
	return f, nil
}

// Refused is how many packets from the device the filter has dropped.
func (f *InboundFilter) Refused() (uint64, error) {
	c, err := nftables.New()
	if err != nil {
		return 0, err
	}
	var n uint64
	for _, ch := range []*nftables.Chain{f.in, f.fwd} {
		rules, err := c.GetRules(f.table, ch)
		if err != nil {
			return 0, err
		}
		for _, r := range rules {
			for _, e := range r.Exprs {
				if ctr, ok := e.(*expr.Counter); ok {
					n += ctr.Packets
				}
			}
		}
	}
	return n, nil
}

// Remove deletes the filter's table.
func (f *InboundFilter) Remove() error {
	c, err := nftables.New()
	if err != nil {
		return err
	}
	c.DelTable(f.table)
	if err := c.Flush(); err != nil && !errors.Is(err, unix.ENOENT) && !strings.Contains(err.Error(), "no such file") {
		return fmt.Errorf("removing nftables table %s: %w", f.table.Name, err)
	}
	return nil
}
