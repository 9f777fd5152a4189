package h1

import (
	"bufio"
	"bytes"
	"context"
	"io"
	"net"
	"net/http"
	"net/url"
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
	body       body
}

func (s *Server) newConn(tcp *net.TCPConn) *conn {
	c := &conn{s: s, tcp: tcp, remoteAddr: tcp.RemoteAddr().String()}
	c.ctx = s.BaseContext
	if c.ctx == nil {
		c.ctx = context.Background()
	}
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
	if c.br.Buffered() == 0 {
		if s.IdleTimeout > 0 {
			c.tcp.SetReadDeadline(time.Now().Add(s.IdleTimeout))
		}
		if _, err := c.br.Peek(1); err != nil {
			return nil, false, err
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
	line, rest, _ := cut(hs, "\r\n")

	method, line, ok1 := cut(line, " ")
	target, proto, ok2 := cut(line, " ")
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
		l, rest, _ = cut(rest, "\r\n")
		colon := indexByte(l, ':')
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
			if !ok || (lengths > 0 && cl != contentLength) {
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
	if contentLength > 0 {
		c.body.reset(c.br, contentLength)
		r.Body = &c.body
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
	if w.aborted {
		return false
	}
	if err := w.finish(); err != nil {
		return false
	}
	if r.Close || w.closeAfter {
		return false
	}
	// Drain what the handler left of the body, if it is small.
	if c.body.remaining > 0 {
		if c.body.remaining > maxDrain {
			return false
		}
		if _, err := c.br.Discard(int(c.body.remaining)); err != nil {
			return false
		}
		c.body.remaining = 0
	}
	c.body.br = nil
	return !c.body.failed
}

// maxDrain is how much of an unread request body is discarded to keep the
// connection; more and the connection is closed (as net/http does).
const maxDrain = 256 << 10

// body is a request body of known length read from the connection.
type body struct {
	br        *bufio.Reader
	remaining int64
	failed    bool
	closed    bool
}

func (b *body) reset(br *bufio.Reader, n int64) {
	b.br, b.remaining, b.failed, b.closed = br, n, false, false
}

func (b *body) Read(p []byte) (int, error) {
	if b.closed {
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
	b.closed = true
	return nil
}
