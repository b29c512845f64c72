package congestion

import (
	"github.com/quic-go/quic-go/internal/monotime"
	"github.com/quic-go/quic-go/internal/protocol"
)

// unlimitedSender is no congestion control: it never limits what may be
// sent nor paces it (Config.DisableCongestionControl).
type unlimitedSender struct{}

var _ SendAlgorithmWithDebugInfos = (*unlimitedSender)(nil)

// NewUnlimitedSender returns a SendAlgorithm that lets everything go.
func NewUnlimitedSender() SendAlgorithmWithDebugInfos { return &unlimitedSender{} }

func (*unlimitedSender) TimeUntilSend(protocol.ByteCount) monotime.Time { return 0 }
func (*unlimitedSender) HasPacingBudget(monotime.Time) bool             { return true }
func (*unlimitedSender) OnPacketSent(monotime.Time, protocol.ByteCount, protocol.PacketNumber, protocol.ByteCount, bool) {
}
func (*unlimitedSender) CanSend(protocol.ByteCount) bool { return true }
func (*unlimitedSender) MaybeExitSlowStart()             {}
func (*unlimitedSender) OnPacketAcked(protocol.PacketNumber, protocol.ByteCount, protocol.ByteCount, monotime.Time) {
}
func (*unlimitedSender) OnCongestionEvent(protocol.PacketNumber, protocol.ByteCount, protocol.ByteCount) {
}
func (*unlimitedSender) OnSpuriousLoss(protocol.PacketNumber)  {}
func (*unlimitedSender) OnRetransmissionTimeout(bool)          {}
func (*unlimitedSender) SetMaxDatagramSize(protocol.ByteCount) {}
func (*unlimitedSender) InSlowStart() bool                     { return false }
func (*unlimitedSender) InRecovery() bool                      { return false }

// GetCongestionWindow reports a window far larger than anything in
// flight: stats and qlog show "unlimited" as a big number.
func (*unlimitedSender) GetCongestionWindow() protocol.ByteCount { return 1 << 30 }
