package netstack

// The outbound half of the link: the stack's packets, GSO segments
// included, become finished IP packets of at most the MTU in reusable
// buffers, handed to out in batches.

import (
	"encoding/binary"

	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// outBatch is how many packets the pump hands to out at most per call:
// a 64 KiB GSO segment is ~50 packets at our MTU.
const outBatch = 64

// outWriter serializes outbound PacketBuffers into its own buffers. It is
// not safe for concurrent use: the pump owns it.
type outWriter struct {
	mtu   int
	bufs  [][]byte // outBatch buffers of mtu bytes, reused for every batch
	batch [][]byte // the filled prefix of bufs, resliced to each packet's length
	views [][]byte // scratch: the current packet's slices
	flush func(pkts [][]byte)

	// dropped counts packets that could not be written: larger than the
	// MTU without GSO, or a GSO packet whose headers make no sense.
	dropped uint64

	// syn, if set, restamps retransmitted SYNs (synstamp.go). They never
	// come as GSO packets.
	syn *synStamps
}

func newOutWriter(mtu int, flush func(pkts [][]byte)) *outWriter {
	w := &outWriter{mtu: mtu, flush: flush}
	slab := make([]byte, outBatch*mtu)
	w.bufs = make([][]byte, outBatch)
	for i := range w.bufs {
		w.bufs[i] = slab[i*mtu : (i+1)*mtu : (i+1)*mtu]
	}
	w.batch = make([][]byte, 0, outBatch)
	w.views = make([][]byte, 0, 16)
	return w
}

// next returns the next free buffer (full length mtu), flushing first if
// the batch is full.
func (w *outWriter) next() []byte {
	if len(w.batch) == outBatch {
		w.Flush()
	}
	return w.bufs[len(w.batch)]
}

// commit adds the first n bytes of the buffer next returned to the batch.
func (w *outWriter) commit(n int) {
	w.batch = append(w.batch, w.bufs[len(w.batch)][:n])
}

// Flush hands the batch to flush and starts a new one.
func (w *outWriter) Flush() {
	if len(w.batch) > 0 {
		w.flush(w.batch)
		w.batch = w.batch[:0]
	}
}

// Write adds pkt to the batch: as one packet, or as MTU-sized TCP segments
// if the stack made it a GSO packet. It does not keep pkt.
func (w *outWriter) Write(pkt *stack.PacketBuffer) {
	vl, off := pkt.AsViewList()
	w.views = w.views[:0]
	for v := vl.Front(); v != nil; v = v.Next() {
		s := v.AsSlice()
		if off >= len(s) {
			off -= len(s)
			continue
		}
		w.views = append(w.views, s[off:])
		off = 0
	}
	g := pkt.GSOOptions
	if (g.Type == stack.GSOTCPv4 || g.Type == stack.GSOTCPv6) && g.NeedsCsum {
		nh, th := pkt.NetworkHeader().Slice(), pkt.TransportHeader().Slice()
		if pkt.HeaderSize() != len(nh)+len(th) {
			w.dropped++
			return
		}
		w.writeTCP(nh, th, g.MSS, pkt.Size()-pkt.HeaderSize())
		return
	}
	size := pkt.Size()
	if size == 0 || size > w.mtu {
		w.dropped++
		return
	}
	b := w.next()
	n := 0
	for _, s := range w.views {
		n += copy(b[n:], s)
	}
	if w.syn != nil {
		w.syn.restamp(b[:n])
	}
	w.commit(n)
}

// writeTCP cuts one TCP segment with headers nh (IP) and th (TCP) and
// payload bytes of payload (the rest of w.views after the headers) into
// packets of at most mss payload bytes and w.mtu bytes in all. Each gets its
// own IP length, IPv4 ID and header checksum, TCP sequence number and full
// TCP checksum; FIN and PSH stay on the last packet only, CWR on the first,
// as a NIC's TSO does. The stack's partial checksum is discarded.
func (w *outWriter) writeTCP(nh, th []byte, mss uint16, payload int) {
	hdrLen := len(nh) + len(th)
	var v4 bool
	switch {
	case len(nh) >= header.IPv4MinimumSize && nh[0]>>4 == 4 && int(nh[0]&0x0f)*4 == len(nh):
		v4 = true
	case len(nh) >= header.IPv6MinimumSize && nh[0]>>4 == 6:
	default:
		w.dropped++
		return
	}
	if len(th) < header.TCPMinimumSize || int(th[12]>>4)*4 != len(th) || payload < 0 {
		w.dropped++
		return
	}
	seg := int(mss)
	if room := w.mtu - hdrLen; seg == 0 || seg > room {
		seg = room
	}
	if seg <= 0 {
		w.dropped++
		return
	}

	// The pseudo-header's address part is the same for every packet.
	var addrSum uint16
	if v4 {
		addrSum = checksum.Checksum(nh[12:20], 0)
	} else {
		addrSum = checksum.Checksum(nh[8:40], 0)
	}
	seq := binary.BigEndian.Uint32(th[4:8])
	flags := th[13]
	var id uint16
	if v4 {
		id = binary.BigEndian.Uint16(nh[4:6])
	}

	// Skip the headers in the views: what follows is payload.
	cur := viewCursor{views: w.views}
	cur.skip(hdrLen)

	for i, done := 0, 0; i == 0 || done < payload; i++ {
		n := min(seg, payload-done)
		b := w.next()
		copy(b, nh)
		copy(b[len(nh):], th)
		if got := cur.read(b[hdrLen : hdrLen+n]); got != n {
			// The views hold less than the packet claims: nothing
			// sensible can be sent.
			w.dropped++
			return
		}
		total := hdrLen + n
		ip := b[:len(nh)]
		if v4 {
			binary.BigEndian.PutUint16(ip[2:4], uint16(total))
			binary.BigEndian.PutUint16(ip[4:6], id+uint16(i))
			ip[10], ip[11] = 0, 0
			binary.BigEndian.PutUint16(ip[10:12], ^checksum.Checksum(ip, 0))
		} else {
			binary.BigEndian.PutUint16(ip[4:6], uint16(total-header.IPv6MinimumSize))
		}
		tcp := b[len(nh):total]
		binary.BigEndian.PutUint32(tcp[4:8], seq+uint32(done))
		f := flags
		if done+n < payload {
			f &^= uint8(header.TCPFlagFin | header.TCPFlagPsh)
		}
		if i > 0 {
			f &^= uint8(header.TCPFlagCwr)
		}
		tcp[13] = f
		tcp[16], tcp[17] = 0, 0
		sum := checksum.Combine(addrSum, uint16(header.TCPProtocolNumber))
		sum = checksum.Combine(sum, uint16(len(tcp)))
		binary.BigEndian.PutUint16(tcp[16:18], ^checksum.Checksum(tcp, sum))
		w.commit(total)
		done += n
	}
}

// viewCursor reads a packet's bytes across its views in order.
type viewCursor struct {
	views [][]byte
	i, o  int // current view and offset in it
}

func (c *viewCursor) skip(n int) {
	for n > 0 && c.i < len(c.views) {
		k := min(n, len(c.views[c.i])-c.o)
		n -= k
		c.o += k
		if c.o == len(c.views[c.i]) {
			c.i++
			c.o = 0
		}
	}
}

// read fills dst from the cursor and returns how many bytes it could.
func (c *viewCursor) read(dst []byte) int {
	n := 0
	for n < len(dst) && c.i < len(c.views) {
		k := copy(dst[n:], c.views[c.i][c.o:])
		n += k
		c.o += k
		if c.o == len(c.views[c.i]) {
			c.i++
			c.o = 0
		}
	}
	return n
}
