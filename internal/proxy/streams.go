package proxy

import (
	"context"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// Upgraded (hijacked) connections are invisible to http.Server.Shutdown, and
// the server's deadlines no longer apply to them. The registry below keeps
// them, so that shutdown can send each WebSocket client a close frame with
// code 1001 (going away) and close it.
//
// Frames from ComfyUI are copied through as raw bytes. To put the close frame
// between two frames rather than inside one, each connection follows the
// frame boundaries of what it writes to the client (frameTracker).

// closeGrace bounds how long shutdown waits for a frame in flight to finish
// before it cuts the connection without a close frame.
const closeGrace = time.Second

// closeFrame builds an unmasked close frame; reason must be under 124 bytes.
func closeFrame(code uint16, reason string) []byte {
	f := []byte{0x88, byte(2 + len(reason)), byte(code >> 8), byte(code)}
	return append(f, reason...)
}

var (
	// goingAwayFrame is sent on shutdown: 1001, going away.
	goingAwayFrame = closeFrame(1001, "server shutting down")
	// revokedFrame is sent when the socket's key is removed: 1008, policy violation.
	revokedFrame = closeFrame(1008, "API key revoked")
)

type streams struct {
	mu    sync.Mutex
	conns map[*streamConn]struct{}

	// Bytes carried so far: in is client to ComfyUI, out is the reverse.
	in, out atomic.Int64
}

func (s *streams) add(c *streamConn) {
	s.mu.Lock()
	if s.conns == nil {
		s.conns = make(map[*streamConn]struct{})
	}
	s.conns[c] = struct{}{}
	s.mu.Unlock()
}

func (s *streams) remove(c *streamConn) {
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
}

func (s *streams) len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.conns)
}

// closeAll closes every connection for which match is true (nil: all),
// sending frame first.
func (s *streams) closeAll(ctx context.Context, frame []byte, match func(*streamConn) bool) int {
	s.mu.Lock()
	conns := make([]*streamConn, 0, len(s.conns))
	for c := range s.conns {
		if match == nil || match(c) {
			conns = append(conns, c)
		}
	}
	s.mu.Unlock()

	var wg sync.WaitGroup
	for _, c := range conns {
		wg.Go(func() { c.goAway(ctx, frame) })
	}
	wg.Wait()
	return len(conns)
}

// streamConn is the client side of a proxied WebSocket.
type streamConn struct {
	net.Conn
	s     *streams
	keyID [32]byte // the key that opened it (zero: none)

	// started is set once the 101 response is out (and by the first Read
	// or Write); before that a close frame would land inside the HTTP
	// response.
	started atomic.Bool

	mu        sync.Mutex // serialises writes with goAway
	frames    frameTracker
	leaving   bool   // goAway is waiting for the current frame to end
	closing   []byte // the close frame goAway sends
	left      bool   // the close frame was sent; refuse further writes
	done      chan struct{}
	closeOnce sync.Once
}

func (c *streamConn) Read(p []byte) (int, error) {
	c.started.Store(true)
	n, err := c.Conn.Read(p)
	c.s.in.Add(int64(n))
	return n, err
}

func (c *streamConn) Write(p []byte) (int, error) {
	c.started.Store(true)
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.left {
		return 0, net.ErrClosed
	}
	if c.leaving {
		// Pass on the rest of the current frame, then the close frame.
		n, atBoundary := c.frames.advance(p)
		if _, err := c.Conn.Write(p[:n]); err != nil {
			return 0, err
		}
		if !atBoundary {
			return n, nil
		}
		c.sendClose()
		return n, net.ErrClosed
	}
	n, err := c.Conn.Write(p)
	c.s.out.Add(int64(n))
	for q := p[:n]; len(q) > 0; {
		k, _ := c.frames.advance(q)
		q = q[k:]
	}
	return n, err
}

// sendClose writes the pending close frame; c.mu must be held.
func (c *streamConn) sendClose() {
	c.Conn.SetWriteDeadline(time.Now().Add(closeGrace))
	c.Conn.Write(c.closing)
	c.left = true
	c.leaving = false
	c.signalDone()
}

func (c *streamConn) signalDone() {
	select {
	case <-c.done:
	default:
		close(c.done)
	}
}

// goAway sends frame (a close frame) at the next frame boundary and closes
// the connection.
func (c *streamConn) goAway(ctx context.Context, frame []byte) {
	// A client that stopped reading can hold c.mu forever in Write; the
	// deadline makes that write fail, so the lock, and shutdown or a key
	// revocation, are never held up for longer than closeGrace.
	c.Conn.SetWriteDeadline(time.Now().Add(closeGrace))
	c.mu.Lock()
	c.closing = frame
	switch {
	case c.left:
	case !c.started.Load():
		c.signalDone() // nothing sent yet: just close
	case c.frames.atBoundary():
		c.sendClose()
	default:
		c.leaving = true
	}
	c.mu.Unlock()

	t := time.NewTimer(closeGrace)
	defer t.Stop()
	select {
	case <-c.done:
	case <-t.C:
	case <-ctx.Done():
	}
	c.Close()
}

func (c *streamConn) Close() error {
	var err error
	c.closeOnce.Do(func() {
		err = c.Conn.Close()
		c.s.remove(c)
		c.mu.Lock()
		c.signalDone()
		c.mu.Unlock()
	})
	return err
}

// frameTracker follows WebSocket frame boundaries (RFC 6455 section 5.2) in
// a byte stream, without looking at payloads.
type frameTracker struct {
	hdr       [14]byte
	hn        int    // header bytes seen of the current frame
	remaining uint64 // payload bytes still to come
	inPayload bool
}

func (t *frameTracker) atBoundary() bool { return t.hn == 0 && !t.inPayload }

// advance consumes p up to the end of the current frame. It returns how many
// bytes it consumed and whether a frame ended there.
func (t *frameTracker) advance(p []byte) (n int, boundary bool) {
	for n < len(p) {
		if t.inPayload {
			k := uint64(len(p) - n)
			if k > t.remaining {
				k = t.remaining
			}
			n += int(k)
			t.remaining -= k
			if t.remaining == 0 {
				t.inPayload = false
				return n, true
			}
			continue
		}
		t.hdr[t.hn] = p[n]
		t.hn++
		n++
		if t.hn < 2 || t.hn < headerLen(t.hdr[1]) {
			continue
		}
		length := payloadLen(t.hdr[:t.hn])
		t.hn = 0
		if length == 0 {
			return n, true
		}
		t.remaining, t.inPayload = length, true
	}
	return n, false
}

// headerLen is the size of a frame header whose second byte is b1.
func headerLen(b1 byte) int {
	n := 2
	switch b1 & 0x7f {
	case 126:
		n += 2
	case 127:
		n += 8
	}
	if b1&0x80 != 0 {
		n += 4 // masking key
	}
	return n
}

func payloadLen(h []byte) uint64 {
	switch l := h[1] & 0x7f; l {
	case 126:
		return uint64(h[2])<<8 | uint64(h[3])
	case 127:
		var v uint64
		for _, b := range h[2:10] {
			v = v<<8 | uint64(b)
		}
		return v
	default:
		return uint64(l)
	}
}
