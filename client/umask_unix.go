//go:build unix

package client

import "syscall"

func umask(m int) int { return syscall.Umask(m) }
