package server

import (
	"errors"
	"net"
	"testing"
)

// TestAddrInUse pins the friendly "port already in use" message on every
// platform: Windows reports a taken port as WSAEADDRINUSE, which
// errors.Is(err, syscall.EADDRINUSE) does not recognise.
func TestAddrInUse(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()

	ln2, err := net.Listen("tcp", ln.Addr().String())
	if err == nil {
		ln2.Close()
		t.Fatalf("second listen on %s succeeded", ln.Addr())
	}
	if !addrInUse(err) {
		t.Errorf("addrInUse(%v) = false, want true", err)
	}

	for _, err := range []error{nil, errors.New("connection refused"), net.ErrClosed} {
		if addrInUse(err) {
			t.Errorf("addrInUse(%v) = true, want false", err)
		}
	}
}
