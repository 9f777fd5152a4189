package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/comfygate/comfygate/internal/comfytest"
	"github.com/comfygate/comfygate/internal/config"
)

func noEnv(string) (string, bool) { return "", false }

func TestHelpAndVersion(t *testing.T) {
	var out, errOut bytes.Buffer
	if err := run(t.Context(), []string{"--help"}, noEnv, nil, &out, &errOut); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"Usage:", "--api-key-file", "--protect-ws", "COMFYGATE_API_KEY_FILE"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("--help lacks %q", want)
		}
	}
	out.Reset()
	if err := run(t.Context(), []string{"--version"}, noEnv, nil, &out, &errOut); err != nil || !strings.HasPrefix(out.String(), "comfygate ") {
		t.Errorf("--version: %q, %v", out.String(), err)
	}
}

func TestBadConfigStopsStartup(t *testing.T) {
	var out, errOut bytes.Buffer
	err := run(t.Context(), []string{"--api-key-file", filepath.Join(t.TempDir(), "missing"), "--port", "x"}, noEnv, nil, &out, &errOut)
	var cfgErr *config.Error
	if err == nil || (!errors.As(err, &cfgErr) && !strings.Contains(err.Error(), "--port")) {
		t.Fatalf("err = %v", err)
	}
	err = run(t.Context(), []string{"--api-key-file", filepath.Join(t.TempDir(), "missing")}, noEnv, nil, &out, &errOut)
	if !errors.As(err, &cfgErr) || !strings.Contains(err.Error(), "--api-key-file: cannot read") {
		t.Errorf("missing key file: %v", err)
	}
}

func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// TestRunServesAndStops runs the whole program on a real port, configured
// from the environment, and stops it as SIGTERM would.
func TestRunServesAndStops(t *testing.T) {
	fake := comfytest.New(t, comfytest.Options{})
	key := "run-test-key-0123456789abcdef012"
	keyFile := filepath.Join(t.TempDir(), "keys")
	os.WriteFile(keyFile, []byte(key+"\n"), 0o600)
	port := freePort(t)
	env := map[string]string{
		"COMFYGATE_UPSTREAM":     fake.URL(),
		"COMFYGATE_API_KEY_FILE": keyFile,
		"COMFYGATE_PORT":         strconv.Itoa(port),
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, nil, func(k string) (string, bool) { v, ok := env[k]; return v, ok }, nil, io.Discard, io.Discard)
	}()
	base := "http://127.0.0.1:" + strconv.Itoa(port)
	var resp *http.Response
	var err error
	for range 100 {
		if resp, err = http.Get(base + "/health"); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	var h map[string]any
	json.NewDecoder(resp.Body).Decode(&h)
	resp.Body.Close()
	if h["status"] != "healthy" {
		t.Errorf("/health = %v", h)
	}
	resp, err = http.Get(base + "/api/queue")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 401 {
		t.Errorf("no key: %d", resp.StatusCode)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("run returned %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("run did not return")
	}
}

// TestDeps keeps test code and the simulator's WebSocket library out of the
// gateway binary.
func TestDeps(t *testing.T) {
	if testing.Short() {
		t.Skip("runs go list")
	}
	out, err := exec.Command("go", "list", "-deps", ".").Output()
	if err != nil {
		t.Fatal(err)
	}
	for _, dep := range strings.Fields(string(out)) {
		switch {
		case dep == "testing",
			strings.Contains(dep, "comfytest"),
			strings.HasPrefix(dep, "github.com/coder/websocket"),
			strings.HasPrefix(dep, "github.com/google/go-cmp"),
			strings.HasPrefix(dep, "go.uber.org/goleak"):
			t.Errorf("comfygate depends on %s", dep)
		}
	}
}
