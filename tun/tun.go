// Package tun is the client's TUN device: a thin layer over
// golang.zx2c4.com/wireguard/tun that fixes the MTU, exposes batched reads
// and writes, and keeps the offload details (virtio-net headers, GSO/GRO)
// inside.
package tun

import (
	"fmt"

	wgtun "golang.zx2c4.com/wireguard/tun"
)

// Offset is the headroom every buffer passed to Read and Write must leave
// in front of the packet: wireguard-go's TUN puts a virtio-net header there
// when offloads are on.
const Offset = 16

// Device is an open TUN device.
type Device struct {
	dev  wgtun.Device
	name string
	mtu  int
}

// Create makes a TUN device with the given name and MTU. It needs
// CAP_NET_ADMIN; the device disappears when it is closed.
func Create(name string, mtu int) (*Device, error) {
	d, err := wgtun.CreateTUN(name, mtu)
	if err != nil {
		return nil, fmt.Errorf("create TUN device %q: %w", name, err)
	}
	real, err := d.Name()
	if err != nil {
		d.Close()
		return nil, err
	}
	return &Device{dev: d, name: real, mtu: mtu}, nil
}

// Name is the kernel's name for the device.
func (d *Device) Name() string { return d.name }

// MTU is the device MTU.
func (d *Device) MTU() int { return d.mtu }

// BatchSize is how many packets one Read or Write may carry.
func (d *Device) BatchSize() int { return d.dev.BatchSize() }

// Read reads up to len(bufs) packets; packet i is bufs[i][Offset:Offset+sizes[i]].
// With offloads one large TCP segment from the kernel is split here into
// MTU-sized packets, so callers always see real IP packets.
func (d *Device) Read(bufs [][]byte, sizes []int) (int, error) {
	return d.dev.Read(bufs, sizes, Offset)
}

// ReadBuffers makes buffers for Read: one per packet of a batch. With
// offloads the device reads a whole TSO segment into a buffer of its own
// and splits it into MTU-sized packets in these, so only the first (which
// takes a packet when there is nothing to split) needs room for the
// largest packet; the others need the device's MTU, which only ever goes
// down from what it was made with.
func (d *Device) ReadBuffers() (bufs [][]byte, sizes []int) {
	n := d.BatchSize()
	bufs = make([][]byte, n)
	bufs[0] = make([]byte, Offset+65535)
	for i := 1; i < n; i++ {
		bufs[i] = make([]byte, Offset+d.mtu)
	}
	return bufs, make([]int, n)
}

// Write writes packets bufs[i][Offset:]. It may coalesce TCP segments (GRO)
// and so may modify the buffers.
func (d *Device) Write(bufs [][]byte) (int, error) {
	return d.dev.Write(bufs, Offset)
}

// Close removes the device.
func (d *Device) Close() error { return d.dev.Close() }
