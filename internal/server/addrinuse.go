//go:build !windows

package server

import (
	"errors"
	"syscall"
)

// addrInUse reports whether err from net.Listen means the address is taken.
func addrInUse(err error) bool {
	return errors.Is(err, syscall.EADDRINUSE)
}
