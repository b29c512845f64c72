// Copyright 2026 The nlvpn authors.
//
// Licensed under the Apache License, Version 2.0 (the "License");
// you may not use this file except in compliance with the License.
// You may obtain a copy of the License at
//
//     http://www.apache.org/licenses/LICENSE-2.0
//
// Unless required by applicable law or agreed to in writing, software
// distributed under the License is distributed on an "AS IS" BASIS,
// WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
// See the License for the specific language governing permissions and
// limitations under the License.

package tcp

import (
	"testing"

	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/waiter"
)

// TestSendBufferWakesWriterWithAnEighthFree: a writer that filled the send
// buffer is woken once an eighth of it is free again, not only once half
// is. In recovery the data SACKed above a hole stays in the buffer until
// the hole is filled; a writer kept asleep until half of it drained sent
// nothing new meanwhile, and a lost resend of the hole, which only data
// sent after it can reveal, waited for the retransmission timer (a 5 s
// lossy download through the relay saw 2-21 such timeouts, 0-1 after).
func TestSendBufferWakesWriterWithAnEighthFree(t *testing.T) {
	s := stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{NewProtocol},
	})
	defer func() {
		s.Close()
		s.Wait()
	}()
	var wq waiter.Queue
	tep, err := s.NewEndpoint(ProtocolNumber, ipv4.ProtocolNumber, &wq)
	if err != nil {
		t.Fatalf("NewEndpoint: %v", err)
	}
	defer tep.Close()
	e := tep.(*Endpoint)
	const size = 8 << 20
	const mss = 1000
	e.ops.SetSendBufferSize(size, false /* notify */)
	if got := e.getSendBufferSize(); got != size {
		t.Fatalf("send buffer = %d, want %d", got, size)
	}
	// A sender whose window asks for less than the buffer already has,
	// so auto-tuning keeps the size.
	e.snd = &sender{ep: e}
	e.snd.MaxPayloadSize = mss
	e.snd.SndCwnd = 100

	woken := 0
	entry, ch := waiter.NewChannelEntry(waiter.WritableEvents)
	wq.EventRegister(&entry)
	defer wq.EventUnregister(&entry)
	drain := func() {
		for {
			select {
			case <-ch:
				woken++
			default:
				return
			}
		}
	}

	// The writer filled the buffer; then ACKs free it 256 KiB at a time.
	e.sndQueueInfo.SndBufUsed = size
	const step = 256 << 10
	wokeAt := -1
	for used := size; used > 0; used -= step {
		e.updateSndBufferUsage(step)
		drain()
		if woken > 0 && wokeAt < 0 {
			wokeAt = size - e.sndQueueInfo.SndBufUsed
		}
	}
	if wokeAt < 0 {
		t.Fatal("the writer was never woken while the buffer drained")
	}
	if want := size / 8; wokeAt != want {
		t.Errorf("writer woken with %d bytes free, want %d (an eighth of %d)", wokeAt, want, size)
	}
	if woken != 1 {
		t.Errorf("writer woken %d times while the buffer drained once, want 1", woken)
	}
}

func TestSendBufferWakeRoom(t *testing.T) {
	for _, c := range []struct{ size, want int }{
		{8 << 20, 1 << 20},   // an eighth
		{1 << 20, 128 << 10}, // an eighth
		{256 << 10, 64 << 10},
		{100 << 10, 50 << 10}, // at most half
		{4 << 10, 2 << 10},
	} {
		if got := sndBufWakeRoom(c.size); got != c.want {
			t.Errorf("sndBufWakeRoom(%d) = %d, want %d", c.size, got, c.want)
		}
	}
}
