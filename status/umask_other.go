//go:build !unix

package status

func umask(m int) int { return m }
