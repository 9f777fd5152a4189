// Package h1 serves plain-TCP HTTP/1.1 with a lean loop for the requests an
// API gateway sees all day, and hands every other connection to a
// net/http server.
//
// net/http's server is general: a per-request context with a background
// read to notice clients going away, a header map parsed through textproto,
// a response writer that clones headers and sniffs, and a goroutine
// hand-off for each of those. For a gateway whose own work is a few
// microseconds per request, that is most of the CPU. This server parses a
// request head straight from the connection's buffer into an *http.Request
// (one string allocation for the whole head), calls the same http.Handler,
// and writes the response with one system call when it fits its buffer.
//
// It only takes what it fully understands: an HTTP/1.1 request in origin
// form, with a Host, token header names and clean values, CRLF line ends,
// and either no body or one Content-Length. A request with anything else —
// Transfer-Encoding, Expect, an upgrade, HTTP/1.0, obs-fold, bare LF, a
// head larger than the buffer — is not parsed here at all: the connection,
// with every byte not yet consumed, goes to the net/http server (Fallback),
// which parses it afresh and keeps it from then on. The two parsers never
// both decide where a request ends, so they cannot disagree about it.
//
// Differences from net/http for the requests served here: the request
// context is not cancelled when the client goes away (a handler notices on
// its next write); 1xx responses and trailers from handlers are dropped;
// http.ResponseController's deadlines and full duplex are not supported
// (Flush is).
package h1

import (
	"bufio"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Server serves HTTP/1.1 on plain TCP listeners.
type Server struct {
	// Handler answers every request served here.
	Handler http.Handler
	// Fallback serves the connections handed over. Its Handler should be
	// the same as Handler. Serve runs Fallback.Serve on an internal
	// listener; Shutdown shuts it down too.
	Fallback *http.Server
	// ReadHeaderTimeout bounds reading a request head once it has begun;
	// IdleTimeout bounds the wait for the next request on a kept-alive
	// connection. Zero means no limit.
	ReadHeaderTimeout time.Duration
	IdleTimeout       time.Duration
	// BaseContext is every request's context. Nil means context.Background().
	BaseContext context.Context
	// Logger receives handler panics. Nil means slog.Default().
	Logger *slog.Logger

	mu       sync.Mutex
	handoff  *handoffListener
	lns      map[net.Listener]struct{}
	conns    map[*conn]struct{}
	closing  atomic.Bool
	fallback sync.Once
	fbErr    chan error
}

// ErrServerClosed is returned by Serve after Shutdown.
var ErrServerClosed = http.ErrServerClosed

func (s *Server) init() {
	s.fallback.Do(func() {
		s.handoff = newHandoffListener()
		s.fbErr = make(chan error, 1)
		go func() { s.fbErr <- s.Fallback.Serve(s.handoff) }()
	})
}

// Serve accepts connections on ln until Shutdown or an accept error.
func (s *Server) Serve(ln net.Listener) error {
	s.init()
	s.mu.Lock()
	if s.closing.Load() {
		s.mu.Unlock()
		return ErrServerClosed
	}
	if s.lns == nil {
		s.lns = make(map[net.Listener]struct{})
		s.conns = make(map[*conn]struct{})
	}
	s.lns[ln] = struct{}{}
	s.mu.Unlock()
	var delay time.Duration
	for {
		nc, err := ln.Accept()
		if err != nil {
			if s.closing.Load() {
				return ErrServerClosed
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) {
				delay = min(max(2*delay, 5*time.Millisecond), time.Second)
				time.Sleep(delay)
				continue
			}
			return err
		}
		delay = 0
		tcp, ok := nc.(*net.TCPConn)
		if !ok { // not TCP (a test pipe, a wrapped listener): net/http's
			s.handoff.deliver(nc)
			continue
		}
		c := s.newConn(tcp)
		s.mu.Lock()
		if s.closing.Load() {
			s.mu.Unlock()
			tcp.Close()
			return ErrServerClosed
		}
		s.conns[c] = struct{}{}
		s.mu.Unlock()
		go c.serve()
	}
}

// Shutdown stops accepting, closes idle connections, waits for requests in
// progress to end (or ctx), and shuts the fallback server down.
func (s *Server) Shutdown(ctx context.Context) error {
	s.stopAccepting()
	fbDone := make(chan error, 1)
	go func() { fbDone <- s.Fallback.Shutdown(ctx) }()
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		if s.closeIdle() {
			break
		}
		select {
		case <-ctx.Done():
			s.closeAll()
			<-fbDone
			return ctx.Err()
		case <-tick.C:
		}
	}
	s.handoff.Close()
	return <-fbDone
}

// stopAccepting marks the server closing and closes its listeners.
func (s *Server) stopAccepting() {
	s.init()
	s.closing.Store(true)
	s.mu.Lock()
	for ln := range s.lns {
		ln.Close()
	}
	s.mu.Unlock()
}

// Close closes every listener and connection at once.
func (s *Server) Close() error {
	s.stopAccepting()
	s.closeAll()
	s.handoff.Close()
	return s.Fallback.Close()
}

// closeIdle closes the connections waiting for a request and reports
// whether none is left.
func (s *Server) closeIdle() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	for c := range s.conns {
		if c.state.Load() == stateIdle {
			c.tcp.Close()
		}
	}
	return len(s.conns) == 0
}

func (s *Server) closeAll() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for c := range s.conns {
		c.tcp.Close()
	}
}

func (s *Server) forget(c *conn) {
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
}

func (s *Server) logger() *slog.Logger {
	if s.Logger != nil {
		return s.Logger
	}
	return slog.Default()
}

// Connection states, for Shutdown.
const (
	stateIdle int32 = iota
	stateActive
)

// handoffListener is the net.Listener the fallback server accepts the
// handed-over connections from.
type handoffListener struct {
	ch   chan net.Conn
	done chan struct{}
	once sync.Once
}

func newHandoffListener() *handoffListener {
	return &handoffListener{ch: make(chan net.Conn), done: make(chan struct{})}
}

func (l *handoffListener) deliver(c net.Conn) {
	select {
	case l.ch <- c:
	case <-l.done:
		c.Close()
	}
}

func (l *handoffListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.ch:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *handoffListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *handoffListener) Addr() net.Addr { return handoffAddr{} }

type handoffAddr struct{}

func (handoffAddr) Network() string { return "tcp" }
func (handoffAddr) String() string  { return "comfygate-handoff" }

// prefixConn is a handed-over connection: the bytes already read from it
// (not consumed by any request) come first.
type prefixConn struct {
	*net.TCPConn
	prefix []byte
}

func (c *prefixConn) Read(p []byte) (int, error) {
	if len(c.prefix) > 0 {
		n := copy(p, c.prefix)
		c.prefix = c.prefix[n:]
		if len(c.prefix) == 0 {
			c.prefix = nil // let the copy go
		}
		return n, nil
	}
	return c.TCPConn.Read(p)
}

// WriteTo hides the embedded connection's WriteTo, which would skip the
// prefix (io.Copy from a hijacked connection uses it).
func (c *prefixConn) WriteTo(w io.Writer) (int64, error) {
	var n int64
	if len(c.prefix) > 0 {
		m, err := w.Write(c.prefix)
		n += int64(m)
		c.prefix = c.prefix[m:]
		if err != nil {
			return n, err
		}
		c.prefix = nil
	}
	m, err := c.TCPConn.WriteTo(w)
	return n + m, err
}

// stack returns the current goroutine's stack, for panic logs.
func stack() string {
	buf := make([]byte, 16<<10)
	return string(buf[:runtime.Stack(buf, false)])
}

// The read and write buffers of closed connections are reused by new ones.
var (
	readers = sync.Pool{New: func() any { return bufio.NewReaderSize(nil, readBufferSize) }}
	writers = sync.Pool{New: func() any { return bufio.NewWriterSize(nil, writeBufferSize) }}
)

const (
	readBufferSize  = 8 << 10
	writeBufferSize = 8 << 10
)
