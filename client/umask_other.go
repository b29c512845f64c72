//go:build !unix

package client

func umask(m int) int { return m }
