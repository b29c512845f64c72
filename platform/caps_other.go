//go:build !linux

package platform

// CanCreateTUN reports whether the TUN mode can run here; not yet on this OS.
func CanCreateTUN() (bool, string) { return false, "the TUN mode is not built for this OS yet" }
