// Package realcomfy starts real ComfyUI servers for end-to-end tests.
//
// The servers are the two unmodified ComfyUI trees that
// ../shared/comfyui/real/install.sh installs (see its README): v0.3.7 with
// its real web UI, and 0.8.0 with a stand-in page. They run on CPU and
// really execute workflows that need no model (EmptyImage, LoadImage,
// SaveImage, image ops), with the real routes, WebSocket messages, queue,
// history and /view. The installation is found in $COMFYUI_REAL_DIR, or in
// DefaultDir.
//
// Each server is started on a free loopback port by the installation's own
// scripts (start-comfyui.sh, start-comfyui-new.sh; stop-comfyui.sh), with
// COMFYUI_FRESH=1 so that it starts with empty input, output and user
// folders. Start-up takes 4 to 8 seconds, so a test binary should start
// each version once (see Shared) rather than once per test.
//
// When the installation is missing, tests skip with a message that says how
// to install it, unless Required reports that the environment (CI=true or
// COMFYUI_REAL_REQUIRED=1) promised one: then they fail. To run them:
//
//	bash ../shared/comfyui/real/install.sh /tmp/comfyui-real   # root: apt packages, then unpacks
//	go test ./internal/realcomfy/
//
// A test that needs its own servers (a fleet, one to stop midway) calls
// Start; tests that can share one server per version use a Shared.
// Servers outlive a test binary that is killed: stop-comfyui.sh PORT, with
// the port from run/comfyui-PORT.pid, stops one by hand.
package realcomfy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Environment variables the package reads.
const (
	// EnvDir names the installation directory.
	EnvDir = "COMFYUI_REAL_DIR"
	// EnvRequired, when true, makes a missing installation a failure.
	EnvRequired = "COMFYUI_REAL_REQUIRED"
)

// DefaultDir is the installation directory when $COMFYUI_REAL_DIR is not
// set; it is also install.sh's default.
const DefaultDir = "/tmp/comfyui-real"

// Version is a ComfyUI version the installation provides.
type Version string

// The versions install.sh installs.
const (
	// V037 is ComfyUI v0.3.7 (commit cc550d59, December 2024) with the
	// real built web UI (frontend 1.4.13). It reports comfyui_version
	// "unknown", and ignores a client-chosen prompt_id.
	V037 Version = "0.3.7"
	// V080 is ComfyUI 0.8.0 (commit 3cd7b32f, January 2026), API only: "/"
	// is a one-line stand-in page. It sends progress_state messages and
	// runs with --disable-api-nodes, which adds a Content-Security-Policy
	// header to every answer.
	V080 Version = "0.8.0"
)

// Versions lists every version, oldest first.
func Versions() []Version { return []Version{V037, V080} }

// tree is the version's folder in the installation.
func (v Version) tree() string {
	if v == V037 {
		return "comfyui-0.3.7"
	}
	return "comfyui-new"
}

// script is the version's start script in the installation.
func (v Version) script() string {
	if v == V037 {
		return "start-comfyui.sh"
	}
	return "start-comfyui-new.sh"
}

// HasWebUI reports whether GET / serves the real ComfyUI frontend.
func (v Version) HasWebUI() bool { return v == V037 }

// ReportedVersion is what the version reports as system.comfyui_version in
// /system_stats: v0.3.7's tree is not a git checkout, so it says "unknown".
func (v Version) ReportedVersion() string {
	if v == V037 {
		return "unknown"
	}
	return string(v)
}

func (v Version) valid() bool { return v == V037 || v == V080 }

// Dir returns the installation directory: $COMFYUI_REAL_DIR, or DefaultDir.
func Dir() string {
	if d := os.Getenv(EnvDir); d != "" {
		return d
	}
	return DefaultDir
}

// Required reports whether a missing installation is a failure rather than
// a reason to skip: on CI (CI=true), or when COMFYUI_REAL_REQUIRED=1.
func Required() bool {
	for _, name := range []string{"CI", EnvRequired} {
		if ok, _ := strconv.ParseBool(os.Getenv(name)); ok {
			return true
		}
	}
	return false
}

// NotInstalledError reports that the installation, or a part of it, is
// missing.
type NotInstalledError struct {
	Dir     string // the installation directory
	Missing string // the first file found missing
}

func (e *NotInstalledError) Error() string {
	return fmt.Sprintf("real ComfyUI not installed at %s (no %s); run ../shared/comfyui/real/install.sh %s",
		e.Dir, e.Missing, e.Dir)
}

// Install is an installation made by install.sh.
type Install struct {
	// Dir is the installation directory, absolute.
	Dir string
}

// Open returns the installation in dir, or a *NotInstalledError when a file
// that any version needs is missing.
func Open(dir string) (*Install, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, err
	}
	in := &Install{Dir: abs}
	for _, v := range Versions() {
		if err := in.check(v); err != nil {
			return nil, err
		}
	}
	return in, nil
}

// Find opens the installation in Dir().
func Find() (*Install, error) { return Open(Dir()) }

// check reports what version v lacks in the installation.
func (in *Install) check(v Version) error {
	if !v.valid() {
		return fmt.Errorf("realcomfy: unknown version %q (have %v)", v, Versions())
	}
	for _, f := range []string{v.script(), "stop-comfyui.sh", "peer-start.sh", filepath.Join(v.tree(), "main.py")} {
		if _, err := os.Stat(filepath.Join(in.Dir, f)); err != nil {
			return &NotInstalledError{Dir: in.Dir, Missing: f}
		}
	}
	return nil
}

// TB is the subset of testing.TB the package needs.
type TB interface {
	Helper()
	Cleanup(func())
	Fatalf(format string, args ...any)
	Skipf(format string, args ...any)
	Logf(format string, args ...any)
}

// Need returns the installation in Dir(). When it is missing, it skips the
// test, or fails it if Required.
func Need(t TB) *Install {
	t.Helper()
	in, err := Find()
	if err != nil {
		notInstalled(t, err)
	}
	return in
}

func notInstalled(t TB, err error) {
	t.Helper()
	if Required() {
		t.Fatalf("%v (a real ComfyUI is required here: CI or %s is set)", err, EnvRequired)
	}
	t.Skipf("%v", err)
}

// StartTimeout bounds one server's start-up, which the scripts give 90 s.
const StartTimeout = 2 * time.Minute

// Start starts one server of each version given, concurrently, on free
// loopback ports, and stops them (and deletes their folders) when the test
// ends. A missing installation skips the test (or fails it, see Required).
func Start(t TB, versions ...Version) []*Server {
	t.Helper()
	in := Need(t)
	ctx, cancel := context.WithTimeout(context.Background(), StartTimeout)
	defer cancel()
	servers, err := in.StartAll(ctx, versions...)
	if err != nil {
		t.Fatalf("%v", err)
	}
	t.Cleanup(func() {
		for _, s := range servers {
			if err := s.stopAndRemove(); err != nil {
				t.Logf("%v", err)
			}
		}
	})
	return servers
}

// StartAll starts one server per version given, concurrently. If any fails
// to start, it stops the others and returns the errors.
func (in *Install) StartAll(ctx context.Context, versions ...Version) ([]*Server, error) {
	servers := make([]*Server, len(versions))
	errs := make([]error, len(versions))
	var wg sync.WaitGroup
	for i, v := range versions {
		wg.Go(func() { servers[i], errs[i] = in.Start(ctx, v) })
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		for _, s := range servers {
			if s != nil {
				s.stopAndRemove()
			}
		}
		return nil, err
	}
	return servers, nil
}

// Start starts a server of version v on a free loopback port, with empty
// folders, and returns once it answers /system_stats.
func (in *Install) Start(ctx context.Context, v Version) (*Server, error) {
	if err := in.check(v); err != nil {
		return nil, err
	}
	// The port is found free, closed, and handed to the script, so another
	// process may take it in between: the script then refuses, and another
	// port is tried.
	var lastErr error
	for range 5 {
		port, err := freePort()
		if err != nil {
			return nil, err
		}
		s := &Server{
			Version: v,
			Port:    port,
			URL:     "http://" + net.JoinHostPort("127.0.0.1", strconv.Itoa(port)),
			dir:     in.Dir,
		}
		err = s.start(ctx, true)
		if err == nil {
			return s, nil
		}
		lastErr = err
		if !errors.Is(err, errPortInUse) {
			return nil, err
		}
	}
	return nil, lastErr
}

func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("realcomfy: finding a free port: %w", err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

var errPortInUse = errors.New("port already in use")

// Server is one running ComfyUI. Its methods are safe for concurrent use.
type Server struct {
	// Version is the ComfyUI version.
	Version Version
	// Port is the loopback port it listens on.
	Port int
	// URL is its base URL, such as "http://127.0.0.1:34567".
	URL string

	dir string

	mu      sync.Mutex // serializes start and stop
	stopped bool
}

// Addr returns the host:port the server listens on.
func (s *Server) Addr() string { return strings.TrimPrefix(s.URL, "http://") }

// start runs the start script, which waits until /system_stats answers.
func (s *Server) start(ctx context.Context, fresh bool) error {
	cmd := exec.CommandContext(ctx, filepath.Join(s.dir, s.Version.script()), strconv.Itoa(s.Port))
	freshEnv := "COMFYUI_FRESH=0"
	if fresh {
		freshEnv = "COMFYUI_FRESH=1"
	}
	cmd.Env = append(os.Environ(), freshEnv)
	// ComfyUI runs detached (setsid) with its output in its log file, so
	// it holds none of these pipes; WaitDelay guards against anything else
	// that would.
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.WaitDelay = 5 * time.Second
	err := cmd.Run()
	if err == nil {
		return nil
	}
	if strings.Contains(out.String(), "already in use") {
		return fmt.Errorf("realcomfy: ComfyUI %s on port %d: %w", s.Version, s.Port, errPortInUse)
	}
	// The script stops a server that never became ready, but not one
	// whose start was cut short by ctx.
	s.runStop()
	return fmt.Errorf("realcomfy: starting ComfyUI %s on port %d: %w\n%s", s.Version, s.Port, err, strings.TrimSpace(out.String()))
}

// Stop stops the server (SIGTERM, then SIGKILL after 2 s) and waits until
// it has exited. Stopping a stopped server does nothing.
func (s *Server) Stop() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopped {
		return nil
	}
	s.stopped = true
	return s.runStop()
}

func (s *Server) runStop() error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, filepath.Join(s.dir, "stop-comfyui.sh"), strconv.Itoa(s.Port)).CombinedOutput()
	if err != nil {
		return fmt.Errorf("realcomfy: stopping ComfyUI %s on port %d: %w\n%s", s.Version, s.Port, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// Restart starts a stopped server again on the same port, keeping its
// input, output and user folders (its queue and history are gone, as after
// any restart of ComfyUI). It fails if the port was taken meanwhile.
func (s *Server) Restart(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.stopped {
		return fmt.Errorf("realcomfy: ComfyUI %s on port %d is running; stop it first", s.Version, s.Port)
	}
	if err := s.start(ctx, false); err != nil {
		return err
	}
	s.stopped = false
	return nil
}

// LogPath returns the path of the server's log file.
func (s *Server) LogPath() string {
	return filepath.Join(s.dir, "run", "comfyui-"+strconv.Itoa(s.Port)+".log")
}

// LogTail returns the last n lines of the server's log, for failure
// messages.
func (s *Server) LogTail(n int) string {
	b, err := os.ReadFile(s.LogPath())
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// DataDir returns the folder that holds the server's input, output, temp
// and user folders.
func (s *Server) DataDir() string {
	return filepath.Join(s.dir, "run", "port-"+strconv.Itoa(s.Port))
}

// RemoveData deletes DataDir of a stopped server. The log stays, for
// whoever has to find out why a test failed.
func (s *Server) RemoveData() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.stopped {
		return fmt.Errorf("realcomfy: ComfyUI %s on port %d is running; stop it first", s.Version, s.Port)
	}
	return os.RemoveAll(s.DataDir())
}

// stopAndRemove stops s and deletes its folders.
func (s *Server) stopAndRemove() error {
	if err := s.Stop(); err != nil {
		return err
	}
	return s.RemoveData()
}

// Shared starts each version at most once and hands the same server to
// every test that asks for it, until Close. A test binary keeps one in a
// package variable and closes it in TestMain after m.Run. The zero value
// is ready to use.
type Shared struct {
	mu      sync.Mutex
	entries map[Version]*sharedEntry
	closed  bool
}

type sharedEntry struct {
	once sync.Once
	srv  *Server
	err  error
}

// Get returns the shared server of version v, starting it on first use. A
// missing installation skips the test (or fails it, see Required); a
// server that failed to start fails every test that asks for it.
func (sh *Shared) Get(t TB, v Version) *Server {
	t.Helper()
	sh.mu.Lock()
	if sh.closed {
		sh.mu.Unlock()
		t.Fatalf("realcomfy: Get(%s) after Close", v)
		return nil
	}
	if sh.entries == nil {
		sh.entries = map[Version]*sharedEntry{}
	}
	e := sh.entries[v]
	if e == nil {
		e = &sharedEntry{}
		sh.entries[v] = e
	}
	sh.mu.Unlock()

	e.once.Do(func() {
		in, err := Find()
		if err != nil {
			e.err = err
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), StartTimeout)
		defer cancel()
		start := time.Now()
		e.srv, e.err = in.Start(ctx, v)
		if e.err == nil {
			t.Logf("started ComfyUI %s at %s in %s", v, e.srv.URL, time.Since(start).Round(time.Millisecond))
		}
	})
	var ni *NotInstalledError
	switch {
	case errors.As(e.err, &ni):
		notInstalled(t, e.err)
	case e.err != nil:
		t.Fatalf("%v", e.err)
	}
	return e.srv
}

// Close stops every server Get started, waits for them to exit, and
// deletes their folders.
func (sh *Shared) Close() error {
	sh.mu.Lock()
	sh.closed = true
	var servers []*Server
	for _, e := range sh.entries {
		// Once.Do has returned for every entry a finished Get saw; an
		// entry still starting is waited for by Do here.
		e.once.Do(func() {})
		if e.srv != nil {
			servers = append(servers, e.srv)
		}
	}
	sh.mu.Unlock()
	errs := make([]error, len(servers))
	var wg sync.WaitGroup
	for i, s := range servers {
		wg.Go(func() { errs[i] = s.stopAndRemove() })
	}
	wg.Wait()
	return errors.Join(errs...)
}
