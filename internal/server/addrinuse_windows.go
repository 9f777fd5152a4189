package server

import (
	"errors"

	"golang.org/x/sys/windows"
)

// addrInUse reports whether err from net.Listen means the address is taken.
// Winsock reports a taken port as WSAEADDRINUSE (10048), which is not
// syscall.EADDRINUSE: on Windows that is an invented value that no system
// call returns.
func addrInUse(err error) bool {
	return errors.Is(err, windows.WSAEADDRINUSE)
}
