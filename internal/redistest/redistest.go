// Package redistest runs a real redis-server for tests: each Server is a
// fresh process on a free loopback port, with no persistence, in a
// temporary directory, stopped when the test ends. Tests that need one are
// skipped when redis-server is not installed, unless REDIS_TESTS_REQUIRED=1
// (as in CI), which makes them fail instead. (Not COMFYGATE_…: comfygate
// refuses to start with a COMFYGATE_ variable it does not know.)
package redistest

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/comfygate/comfygate/internal/redisstate"
)

// RequiredEnv names the variable that turns a missing redis-server from a
// skip into a failure.
const RequiredEnv = "REDIS_TESTS_REQUIRED"

// Server is one redis-server process.
type Server struct {
	t    testing.TB
	bin  string
	dir  string
	port int
	args []string

	mu  sync.Mutex
	cmd *exec.Cmd
}

// Start runs a redis-server for t, stopped at t's end.
func Start(t testing.TB) *Server {
	t.Helper()
	return StartWith(t)
}

// StartWith is Start with more redis-server arguments, such as
// "--requirepass", "secret".
func StartWith(t testing.TB, args ...string) *Server {
	t.Helper()
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		if os.Getenv(RequiredEnv) == "1" {
			t.Fatalf("redis-server is not installed (apt-get install redis-server), and %s=1", RequiredEnv)
		}
		t.Skipf("redis-server is not installed (apt-get install redis-server); set %s=1 to fail instead of skipping", RequiredEnv)
	}
	s := &Server{t: t, bin: bin, dir: t.TempDir(), args: args}
	t.Cleanup(s.Stop)
	var last error
	for range 5 { // the free port may be taken before redis-server binds it
		if s.port, err = freePort(); err != nil {
			t.Fatal(err)
		}
		if last = s.start(); last == nil {
			return s
		}
	}
	t.Fatalf("redis-server did not start: %v", last)
	return nil
}

func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// start runs the process on s.port and waits until it answers PING.
func (s *Server) start() error {
	logPath := filepath.Join(s.dir, "redis.log")
	cmd := exec.Command(s.bin, append([]string{
		"--port", strconv.Itoa(s.port), "--bind", "127.0.0.1",
		"--save", "", "--appendonly", "no", "--dir", s.dir,
		"--daemonize", "no", "--logfile", logPath}, s.args...)...)
	if err := cmd.Start(); err != nil {
		return err
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case err := <-exited:
			return fmt.Errorf("redis-server exited: %v; log: %s", err, tail(logPath))
		default:
		}
		if ping(s.Addr()) {
			s.mu.Lock()
			s.cmd = cmd
			s.mu.Unlock()
			// Keep reaping the process when it is stopped later.
			go func() { <-exited }()
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	cmd.Process.Kill()
	<-exited
	return fmt.Errorf("redis-server did not answer on %s; log: %s", s.Addr(), tail(logPath))
}

// ping sends a RESP PING and reads one line, without a client library.
func ping(addr string) bool {
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return false
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(time.Second))
	if _, err := c.Write([]byte("*1\r\n$4\r\nPING\r\n")); err != nil {
		return false
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	// A server with a password answers -NOAUTH: it is up all the same.
	return err == nil && (strings.HasPrefix(line, "+PONG") || strings.HasPrefix(line, "-NOAUTH"))
}

func tail(path string) string {
	b, _ := os.ReadFile(path)
	if len(b) > 2000 {
		b = b[len(b)-2000:]
	}
	return string(b)
}

// Addr is the server's 127.0.0.1:port.
func (s *Server) Addr() string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(s.port)) }

// RawURL is redis://127.0.0.1:port/0.
func (s *Server) RawURL() string { return "redis://" + s.Addr() + "/0" }

// URL is RawURL, parsed.
func (s *Server) URL() *redisstate.URL {
	u, err := redisstate.ParseURL(s.RawURL())
	if err != nil {
		s.t.Fatal(err)
	}
	return u
}

// Client returns a client opened as the gateway opens one (bounded calls,
// the breaker), closed at the test's end.
func (s *Server) Client(t testing.TB) *redis.Client {
	c := redisstate.Open(s.URL(), nil)
	t.Cleanup(func() { c.Close() })
	return c
}

// Stop kills the server (SIGKILL: nothing is saved, as when Redis is lost).
// It may be started again with Restart.
func (s *Server) Stop() {
	s.mu.Lock()
	cmd := s.cmd
	s.cmd = nil
	s.mu.Unlock()
	if cmd == nil {
		return
	}
	cmd.Process.Kill()
	// Wait until the port is free, so that a Restart can bind it.
	for range 500 {
		if c, err := net.DialTimeout("tcp", s.Addr(), 100*time.Millisecond); err != nil {
			break
		} else {
			c.Close()
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Restart starts a stopped server again on the same port, empty.
func (s *Server) Restart() {
	s.t.Helper()
	s.Stop()
	var err error
	for range 50 {
		if err = s.start(); err == nil {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	s.t.Fatalf("redis-server did not restart on %s: %v", s.Addr(), err)
}

func (s *Server) process() *os.Process {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd == nil {
		s.t.Fatal("redis-server is not running")
	}
	return s.cmd.Process
}
