package session

import (
	"testing"
	"time"
)

// Ended sums the bytes of every session that ended, so a node's totals
// (its live session plus these) never go back when it replaces one.
func TestEndedKeepsBytes(t *testing.T) {
	p := newPeerPair(t)
	var ended Ended
	var wantTx, wantRx uint64
	for i, n := range []uint32{40, 25} {
		id := uint64(0x5e55_0100 + i)
		cq, aq := p.connect(t, id)
		cs, as := New(id, cq, quietLog()), New(id, aq, quietLog())
		toAgent, toClient := newCollector(), newCollector()
		startSession(cs, toClient.recv)
		startSession(as, toAgent.recv)
		pump(t, cs, toAgent, 0, n, 'c')
		pump(t, as, toClient, 0, n/2, 'a')
		st := cs.Stats()
		if st.TxBytes == 0 || st.RxBytes == 0 {
			t.Fatalf("session %d moved no bytes: %+v", i, st)
		}
		wantTx += st.TxBytes
		wantRx += st.RxBytes
		cq.CloseWithError(0, "replaced")
		select {
		case <-cs.Done():
		case <-time.After(3 * time.Second):
			t.Fatal("Run did not return after the connection closed")
		}
		ended.Add(cs)
		if tx, rx := ended.Bytes(); tx != wantTx || rx != wantRx {
			t.Fatalf("after %d sessions Ended.Bytes = %d, %d; want %d, %d", i+1, tx, rx, wantTx, wantRx)
		}
	}
}
