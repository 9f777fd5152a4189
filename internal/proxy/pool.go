package proxy

import (
	"bufio"
	"context"
	"net"
	"sync"
	"syscall"
	"time"
)

// upstreamConn is one keep-alive HTTP/1.1 connection to ComfyUI. It is used
// by one request at a time, from that request's handler goroutine: no
// reader or writer goroutines sit behind it, as they do behind each of
// http.Transport's connections.
type upstreamConn struct {
	tcp *net.TCPConn
	raw syscall.RawConn
	br  *bufio.Reader
	bw  *bufio.Writer
	// idleSince is when the connection went back to the pool.
	idleSince time.Time
}

// connPool keeps idle connections to one ComfyUI address, most recently
// used first, so that a busy gateway keeps reusing a small warm set and the
// connections at the bottom age out.
type connPool struct {
	addr        string
	dialer      net.Dialer
	maxIdle     int
	idleTimeout time.Duration

	mu   sync.Mutex
	idle []*upstreamConn
}

// Idle connections are kept at most this long. aiohttp closes keep-alive
// connections after 75 s of quiet (its keepalive_timeout); dropping ours
// well before that avoids sending a request on a connection ComfyUI is
// closing.
const upstreamIdleTimeout = 50 * time.Second

// checkAfter is the idle time after which a pooled connection is checked
// for a close from ComfyUI (a restart, say) before it is reused. Under load
// connections come back within microseconds and the check is skipped.
const checkAfter = time.Second

func newConnPool(addr string, dialTimeout time.Duration, maxIdle int) *connPool {
	return &connPool{
		addr:        addr,
		dialer:      net.Dialer{Timeout: dialTimeout, KeepAlive: 30 * time.Second},
		maxIdle:     maxIdle,
		idleTimeout: upstreamIdleTimeout,
	}
}

// get returns an idle connection (reused=true) or dials a new one.
func (p *connPool) get(ctx context.Context) (c *upstreamConn, reused bool, err error) {
	now := time.Now()
	for {
		p.mu.Lock()
		n := len(p.idle)
		if n == 0 {
			p.mu.Unlock()
			break
		}
		c = p.idle[n-1]
		p.idle[n-1] = nil
		p.idle = p.idle[:n-1]
		p.mu.Unlock()
		idle := now.Sub(c.idleSince)
		if idle < p.idleTimeout && (idle < checkAfter || c.open()) {
			return c, true, nil
		}
		c.close()
	}
	return p.dial(ctx)
}

func (p *connPool) dial(ctx context.Context) (*upstreamConn, bool, error) {
	nc, err := p.dialer.DialContext(ctx, "tcp", p.addr)
	if err != nil {
		return nil, false, err
	}
	tcp := nc.(*net.TCPConn)
	raw, err := tcp.SyscallConn()
	if err != nil {
		tcp.Close()
		return nil, false, err
	}
	br := readers.Get().(*bufio.Reader)
	br.Reset(tcp)
	bw := writers.Get().(*bufio.Writer)
	bw.Reset(tcp)
	return &upstreamConn{tcp: tcp, raw: raw, br: br, bw: bw}, false, nil
}

// The buffers of closed connections, and of the handshakes of upgraded
// ones, are reused: thousands of WebSockets opened in a burst would
// otherwise leave 8 KiB of garbage each.
var (
	readers = sync.Pool{New: func() any { return bufio.NewReaderSize(nil, 4<<10) }}
	writers = sync.Pool{New: func() any { return bufio.NewWriterSize(nil, 4<<10) }}
)

// release returns the buffers to their pools; the connection is closed or
// no longer read through them.
func (c *upstreamConn) release() {
	if c.br != nil {
		c.br.Reset(nil)
		readers.Put(c.br)
		c.bw.Reset(nil)
		writers.Put(c.bw)
		c.br, c.bw = nil, nil
	}
}

// put returns a connection whose last exchange ended cleanly. Connections
// idle for too long are closed on the way.
func (p *connPool) put(c *upstreamConn) {
	c.idleSince = time.Now()
	p.mu.Lock()
	var stale []*upstreamConn
	for len(p.idle) > 0 && c.idleSince.Sub(p.idle[0].idleSince) >= p.idleTimeout {
		stale = append(stale, p.idle[0])
		p.idle[0] = nil
		p.idle = p.idle[1:]
	}
	full := len(p.idle) >= p.maxIdle
	if !full {
		p.idle = append(p.idle, c)
	}
	p.mu.Unlock()
	for _, s := range stale {
		s.close()
	}
	if full {
		c.close()
	}
}

// closeIdle closes every idle connection (shutdown).
func (p *connPool) closeIdle() {
	p.mu.Lock()
	idle := p.idle
	p.idle = nil
	p.mu.Unlock()
	for _, c := range idle {
		c.close()
	}
}

func (c *upstreamConn) close() {
	c.tcp.Close()
	c.release()
}

// open reports whether an idle connection is still usable: ComfyUI has
// neither closed it nor sent anything unasked. It peeks at the socket
// without blocking and without consuming anything.
func (c *upstreamConn) open() bool {
	if c.br.Buffered() > 0 {
		return false
	}
	alive := false
	var b [1]byte
	err := c.raw.Read(func(fd uintptr) bool {
		// EAGAIN: nothing to read, still open. 0 bytes: closed by ComfyUI.
		// Any byte: an unasked answer; the connection is out of step.
		_, _, err := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		alive = err == syscall.EAGAIN || err == syscall.EWOULDBLOCK
		return true
	})
	return err == nil && alive
}
