package platform

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"syscall"

	"github.com/vishvananda/netlink"
)

// Configure brings the interface up with its address and adds the routes,
// with netlink. A route that already exists (the same prefix through another
// interface, say the machine's own LAN) is skipped and reported in skipped,
// never replaced: taking over a route the user relies on would cut them off.
func Configure(cfg Config) (undo Undo, skipped []netip.Prefix, err error) {
	link, err := netlink.LinkByName(cfg.Interface)
	if err != nil {
		return nil, nil, fmt.Errorf("interface %s: %w", cfg.Interface, err)
	}
	var added []*netlink.Route
	var addr *netlink.Addr
	var once sync.Once
	undo = func() error {
		var errs []error
		once.Do(func() {
			for _, r := range added {
				if err := netlink.RouteDel(r); err != nil && !errors.Is(err, syscall.ESRCH) && !errors.Is(err, syscall.ENODEV) {
					errs = append(errs, fmt.Errorf("remove route %s: %w", r.Dst, err))
				}
			}
			if addr != nil {
				if err := netlink.AddrDel(link, addr); err != nil && !errors.Is(err, syscall.EADDRNOTAVAIL) && !errors.Is(err, syscall.ENODEV) {
					errs = append(errs, fmt.Errorf("remove address: %w", err))
				}
			}
		})
		return errors.Join(errs...)
	}
	a := &netlink.Addr{IPNet: ipNet(cfg.Addr)}
	if err := netlink.AddrAdd(link, a); err != nil && !errors.Is(err, syscall.EEXIST) {
		return nil, nil, fmt.Errorf("set address %s on %s: %w", cfg.Addr, cfg.Interface, err)
	}
	addr = a
	if err := netlink.LinkSetUp(link); err != nil {
		undo()
		return nil, nil, fmt.Errorf("bring %s up: %w", cfg.Interface, err)
	}
	for _, p := range cfg.Routes {
		r := &netlink.Route{LinkIndex: link.Attrs().Index, Dst: ipNet(p), Scope: netlink.SCOPE_LINK}
		if p.Addr().Is4() == cfg.Addr.Addr().Is4() {
			r.Src = net.IP(cfg.Addr.Addr().AsSlice())
		}
		if err := netlink.RouteAdd(r); err != nil {
			if errors.Is(err, syscall.EEXIST) {
				skipped = append(skipped, p)
				continue
			}
			undo()
			return nil, nil, fmt.Errorf("add route %s dev %s: %w", p, cfg.Interface, err)
		}
		added = append(added, r)
	}
	return undo, skipped, nil
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: net.IP(p.Addr().AsSlice()), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}
