package h1

import (
	"bufio"
	"bytes"
	"context"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// conn is one client connection served here.
type conn struct {
	s          *Server
	tcp        *net.TCPConn
	br         *bufio.Reader
	bw         *bufio.Writer
	remoteAddr string
	ctx        context.Context
	state      atomic.Int32
	res        response
	// body is the current request's body (nil: none).
	body *body
	// requests counts the requests read; lastPost is set when the last one
	// was a POST (net/http then skips a stray CRLF after its body).
	requests int
	lastPost bool
}

func (s *Server) newConn(tcp *net.TCPConn) *conn {
	c := &conn{s: s, tcp: tcp, remoteAddr: tcp.RemoteAddr().String()}
	c.ctx = s.BaseContext
	if c.ctx == nil {
		c.ctx = context.Background()
	}
	c.ctx = context.WithValue(c.ctx, http.ServerContextKey, s.Fallback)
	c.ctx = context.WithValue(c.ctx, http.LocalAddrContextKey, tcp.LocalAddr())
	c.res.c = c
	return c
}

// serve runs the connection's request loop until the client closes, an
// error, or a hand-over.
func (c *conn) serve() {
	c.br = readers.Get().(*bufio.Reader)
	c.br.Reset(c.tcp)
	c.bw = writers.Get().(*bufio.Writer)
	c.bw.Reset(c.tcp)
	handedOver := false
	defer func() {
		if p := recover(); p != nil && p != http.ErrAbortHandler {
			c.s.logger().Error("panic serving request", "client", c.remoteAddr, "panic", p, "stack", stack())
		}
		c.s.forget(c)
		if !handedOver {
			c.bw.Flush() // answers held back for pipelined requests
			c.tcp.Close()
			c.release()
		}
	}()
	for {
		c.state.Store(stateIdle)
		if c.s.closing.Load() {
			return
		}
		req, ok, err := c.readRequest()
		if err != nil {
			return
		}
		if !ok {
			handedOver = true
			c.handOver()
			return
		}
		c.state.Store(stateActive)
		if !c.serveRequest(req) {
			return
		}
	}
}

// release returns the buffers to their pools.
func (c *conn) release() {
	c.br.Reset(nil)
	readers.Put(c.br)
	c.bw.Reset(nil)
	writers.Put(c.bw)
	c.br, c.bw = nil, nil
}

// handOver gives the connection, with what is buffered and unconsumed, to
// the fallback server.
func (c *conn) handOver() {
	if c.bw.Flush() != nil {
		c.tcp.Close()
		c.release()
		return
	}
	c.tcp.SetDeadline(time.Time{})
	var nc net.Conn = c.tcp
	if n := c.br.Buffered(); n > 0 {
		b, _ := c.br.Peek(n)
		nc = &prefixConn{TCPConn: c.tcp, prefix: append([]byte(nil), b...)}
	}
	c.release()
	c.s.handoff.deliver(nc)
}

// readRequest waits for the next request and parses its head. ok is false
// when the request is not one served here (hand it over).
func (c *conn) readRequest() (req *http.Request, ok bool, err error) {
	s := c.s
	// The first request must begin within ReadHeaderTimeout, as with
	// net/http; later ones within IdleTimeout.
	wait := s.IdleTimeout
	if c.requests == 0 && s.ReadHeaderTimeout > 0 {
		wait = s.ReadHeaderTimeout
	}
	if c.br.Buffered() == 0 {
		if wait > 0 {
			c.tcp.SetReadDeadline(time.Now().Add(wait))
		}
		if _, err := c.br.Peek(1); err != nil {
			return nil, false, err
		}
	}
	if c.lastPost {
		// Old clients send CRLF after a POST body; net/http skips up to
		// four CR or LF bytes there.
		peek, _ := c.br.Peek(min(4, c.br.Buffered()))
		n := 0
		for n < len(peek) && (peek[n] == '\r' || peek[n] == '\n') {
			n++
		}
		c.br.Discard(n)
		if c.br.Buffered() == 0 {
			if _, err := c.br.Peek(1); err != nil {
				return nil, false, err
			}
		}
	}
	if s.ReadHeaderTimeout > 0 {
		c.tcp.SetReadDeadline(time.Now().Add(s.ReadHeaderTimeout))
	}
	// Find the end of the head in the buffer, reading more as needed.
	var head []byte
	for {
		buf, _ := c.br.Peek(c.br.Buffered())
		end, bad := headEnd(buf)
		if bad {
			return nil, false, nil
		}
		if end > 0 {
			head = buf[:end]
			break
		}
		if len(buf) == c.br.Size() {
			return nil, false, nil // larger than the buffer: net/http's
		}
		if _, err := c.br.Peek(len(buf) + 1); err != nil {
			return nil, false, err
		}
	}
	req, ok = c.parse(head)
	if !ok {
		return nil, false, nil
	}
	c.br.Discard(len(head))
	c.requests++
	c.lastPost = req.Method == http.MethodPost
	if s.ReadHeaderTimeout > 0 || s.IdleTimeout > 0 {
		c.tcp.SetReadDeadline(time.Time{})
	}
	return req, true, nil
}

// headEnd returns the length of the head (through its blank line) at the
// start of buf, or 0 if buf does not hold all of it yet. bad is set at the
// first LF not preceded by CR, and at a blank line before the request line
// (net/http tolerates both; they are not served here).
func headEnd(buf []byte) (end int, bad bool) {
	i := 0
	for {
		j := bytes.IndexByte(buf[i:], '\n')
		if j < 0 {
			return 0, false
		}
		j += i
		if j == 0 || buf[j-1] != '\r' {
			return 0, true
		}
		if j == 1 { // "\r\n" first: a blank line before the request
			return 0, true
		}
		if j >= 3 && buf[j-2] == '\n' && buf[j-3] == '\r' {
			return j + 1, false
		}
		i = j + 1
	}
}

// parse builds the request from a complete head, or reports ok=false for
// anything not served here.
func (c *conn) parse(head []byte) (*http.Request, bool) {
	// One string holds the whole head; every field is a slice of it.
	hs := string(head[:len(head)-4+2]) // through the last header's CRLF
	line, rest, _ := strings.Cut(hs, "\r\n")

	method, line, ok1 := strings.Cut(line, " ")
	target, proto, ok2 := strings.Cut(line, " ")
	if !ok1 || !ok2 || proto != "HTTP/1.1" || !isToken(method) || len(target) == 0 || target[0] != '/' || !cleanTarget(target) {
		return nil, false
	}
	u, err := url.ParseRequestURI(target)
	if err != nil {
		return nil, false
	}

	n := 0
	for i := 0; i < len(rest); i++ {
		if rest[i] == '\n' {
			n++
		}
	}
	if n > maxHeaders {
		return nil, false
	}
	h := make(http.Header, n)
	var host string
	hosts := 0
	contentLength := int64(0)
	lengths := 0
	closeAfter := false
	for len(rest) > 0 {
		var l string
		l, rest, _ = strings.Cut(rest, "\r\n")
		colon := strings.IndexByte(l, ':')
		if colon <= 0 || !isToken(l[:colon]) {
			return nil, false
		}
		value := trimOWS(l[colon+1:])
		if !cleanValue(value) {
			return nil, false
		}
		name := canonical(l[:colon])
		switch name {
		case "Host":
			host = value
			hosts++
			continue
		case "Content-Length":
			cl, ok := parseLength(value)
			if !ok || lengths > 0 { // net/http's rules for repeats: its own
				return nil, false
			}
			contentLength = cl
			lengths++
		case "Transfer-Encoding", "Expect", "Upgrade", "Te", "Trailer":
			return nil, false
		case "Connection":
			switch {
			case equalFold(value, "close"):
				closeAfter = true
			case equalFold(value, "keep-alive"):
			default:
				return nil, false // upgrades and hop-by-hop lists: net/http's
			}
		}
		h[name] = append(h[name], value)
	}
	if hosts != 1 || !validHost(host) {
		return nil, false
	}
	r := &http.Request{
		Method:        method,
		URL:           u,
		Proto:         "HTTP/1.1",
		ProtoMajor:    1,
		ProtoMinor:    1,
		Header:        h,
		Host:          host,
		RequestURI:    target,
		RemoteAddr:    c.remoteAddr,
		ContentLength: contentLength,
		Close:         closeAfter,
		Body:          http.NoBody,
	}
	if pragma, ok := h["Pragma"]; ok && len(pragma) > 0 && pragma[0] == "no-cache" {
		if _, ok := h["Cache-Control"]; !ok {
			h["Cache-Control"] = []string{"no-cache"} // as net/http does
		}
	}
	c.body = nil
	if contentLength > 0 {
		c.body = &body{br: c.br, remaining: contentLength}
		r.Body = c.body
	}
	return r.WithContext(c.ctx), true
}

// maxHeaders caps the header lines of a request served here.
const maxHeaders = 100

// serveRequest runs the handler and finishes the response. It reports
// whether the connection can carry another request.
func (c *conn) serveRequest(r *http.Request) (keepAlive bool) {
	w := &c.res
	w.reset(r)
	func() {
		defer func() {
			if p := recover(); p != nil {
				if p != http.ErrAbortHandler {
					c.s.logger().Error("panic serving request", "method", r.Method, "path", r.URL.Path,
						"client", c.remoteAddr, "panic", p, "stack", stack())
				}
				keepAlive = false
				w.aborted = true
			}
		}()
		c.s.Handler.ServeHTTP(w, r)
	}()
	// Detach the body first, whatever happens next: a handler's goroutine
	// that reads it late gets an error, never the next request's bytes nor
	// (once the connection is closed and its buffer reused) another
	// client's.
	var remaining int64
	failed := false
	if b := c.body; b != nil {
		c.body = nil
		b.mu.Lock()
		remaining, failed = b.remaining, b.failed
		b.br, b.detached = nil, true
		b.mu.Unlock()
	}
	w.unread = remaining
	if w.aborted {
		return false
	}
	if err := w.finish(); err != nil {
		return false
	}
	if r.Close || w.closeAfter || failed || remaining > maxDrain {
		return false
	}
	// What the handler left of the body is drained, as it is small.
	if remaining > 0 {
		if _, err := c.br.Discard(int(remaining)); err != nil {
			return false
		}
	}
	return true
}

// maxDrain is how much of an unread request body is discarded to keep the
// connection; more and the connection is closed (as net/http does).
const maxDrain = 256 << 10

// body is a request body of known length read from the connection.
type body struct {
	mu        sync.Mutex
	br        *bufio.Reader
	remaining int64
	failed    bool
	closed    bool
	// detached is set when the handler has returned: the connection has
	// moved on.
	detached bool
}

func (b *body) Read(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed || b.detached {
		return 0, http.ErrBodyReadAfterClose
	}
	if b.remaining <= 0 {
		return 0, io.EOF
	}
	if int64(len(p)) > b.remaining {
		p = p[:b.remaining]
	}
	n, err := b.br.Read(p)
	b.remaining -= int64(n)
	if err == io.EOF {
		b.failed = true
		return n, io.ErrUnexpectedEOF
	}
	if err != nil {
		b.failed = true
		return n, err
	}
	if b.remaining == 0 {
		return n, io.EOF
	}
	return n, nil
}

// Close marks the body closed; what is left is drained (or the connection
// closed) after the handler returns.
func (b *body) Close() error {
	b.mu.Lock()
	b.closed = true
	b.mu.Unlock()
	return nil
}

// unread is how much of the body is left (0: none or detached).
func (b *body) unread() int64 {
	if b == nil {
		return 0
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.remaining
}
