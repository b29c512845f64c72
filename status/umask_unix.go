//go:build unix

package status

import "syscall"

func umask(m int) int { return syscall.Umask(m) }
