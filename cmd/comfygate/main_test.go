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

// noEnv is an empty environment.
var noEnv []string

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
	env := []string{
		"COMFYGATE_UPSTREAM=" + fake.URL(),
		"COMFYGATE_API_KEY_FILE=" + keyFile,
		"COMFYGATE_PORT=" + strconv.Itoa(port),
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, nil, env, nil, io.Discard, io.Discard)
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

// TestDeps keeps test code out of the gateway binary.
//
// The simulator (internal/comfytest, and the coder/websocket library its
// /ws uses) is in: "comfygate demo" runs it in process, so that the first
// command of the README needs nothing else (issue #16). It adds about
// 0.7 MB to the binary. Nothing but the demo may use it, which
// TestOnlyTheDemoUsesTheSimulator checks.
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
			strings.HasPrefix(dep, "github.com/google/go-cmp"),
			strings.HasPrefix(dep, "go.uber.org/goleak"):
			t.Errorf("comfygate depends on %s", dep)
		}
	}
}

// TestOnlyTheDemoUsesTheSimulator: the simulated ComfyUI is in the binary
// for "comfygate demo" only; no package of the gateway itself may import it,
// and in this package only demo.go does.
func TestOnlyTheDemoUsesTheSimulator(t *testing.T) {
	if testing.Short() {
		t.Skip("runs go list")
	}
	out, err := exec.Command("go", "list", "-deps", "-f", "{{.ImportPath}} {{join .Imports \" \"}}", ".").Output()
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		pkg, imports, _ := strings.Cut(line, " ")
		if pkg == "github.com/comfygate/comfygate/cmd/comfygate" || pkg == "github.com/comfygate/comfygate/internal/comfytest" {
			continue
		}
		for _, imp := range strings.Fields(imports) {
			if strings.HasSuffix(imp, "internal/comfytest") {
				t.Errorf("%s imports the simulator", pkg)
			}
		}
	}
	files, err := filepath.Glob("*.go")
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		if f == "demo.go" || strings.HasSuffix(f, "_test.go") {
			continue
		}
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if bytes.Contains(b, []byte("internal/comfytest")) {
			t.Errorf("%s imports the simulator; only demo.go may", f)
		}
	}
}

// TestExitStatus runs the binary: mistakes in what was typed (a flag, a
// variable, a subcommand) exit 2, with the problem on standard error.
func TestExitStatus(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	bin := buildBinary(t)
	keyFile := filepath.Join(t.TempDir(), "keys.txt")
	os.WriteFile(keyFile, []byte("0123456789abcdef0123456789abcdef\n"), 0o600)
	tests := []struct {
		name string
		args []string
		env  []string
		code int
		want string
	}{
		// Issue #15 item 2: this started a gateway without a key.
		{"misspelt variable", []string{"--check-config"}, []string{"COMFYGATE_API_KEYFILE=" + keyFile}, 2, "did you mean COMFYGATE_API_KEY_FILE?"},
		{"unknown flag", []string{"--api-keyfile", keyFile}, nil, 2, "did you mean --api-key-file?"},
		{"stray argument", []string{"serve"}, nil, 2, `unexpected argument "serve"`},
		// Issue #15 item 8: "comfygate keys" alone exited 0.
		{"keys without a command", []string{"keys"}, nil, 2, "which keys command?"},
		{"demo with an upstream", []string{"demo", "--upstream", "http://127.0.0.1:8189"}, nil, 2, "refusing to start"},
		{"bad key file", []string{"keys", "check", keyFile + ".missing"}, nil, 1, "no such file"},
		{"check-config", []string{"--check-config"}, []string{"COMFYGATE_API_KEY_FILE=" + keyFile, "COMFYGATE_URL=http://127.0.0.1:8188"}, 0, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cmd := exec.Command(bin, tt.args...)
			for _, kv := range os.Environ() {
				if !strings.HasPrefix(strings.ToUpper(kv), "COMFYGATE_") {
					cmd.Env = append(cmd.Env, kv)
				}
			}
			cmd.Env = append(cmd.Env, tt.env...)
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			err := cmd.Run()
			code := 0
			var ee *exec.ExitError
			if errors.As(err, &ee) {
				code = ee.ExitCode()
			} else if err != nil {
				t.Fatal(err)
			}
			if code != tt.code || !strings.Contains(stderr.String(), tt.want) {
				t.Errorf("exit %d, stderr %q; want exit %d and %q", code, stderr.String(), tt.code, tt.want)
			}
		})
	}
}

// TestCheckConfigSaysAuthIsOff pins issue #15 item 2's second half: with no
// key, --check-config and the start-up log say plainly that anyone who
// reaches the port can use ComfyUI, on loopback too.
func TestCheckConfigSaysAuthIsOff(t *testing.T) {
	var out, errOut bytes.Buffer
	if err := run(t.Context(), []string{"--check-config"}, noEnv, nil, &out, &errOut); err != nil {
		t.Fatal(err)
	}
	want := "authentication is OFF: no API key is configured, so anyone who can reach 127.0.0.1:8188"
	if !strings.Contains(out.String(), "configuration OK: 0 keys,") || !strings.Contains(out.String(), want) {
		t.Errorf("--check-config printed %q", out.String())
	}
	if !strings.Contains(errOut.String(), `"level":"WARN","msg":"`+want) {
		t.Errorf("the log lacks the warning: %q", errOut.String())
	}

	keyFile := filepath.Join(t.TempDir(), "keys.txt")
	os.WriteFile(keyFile, []byte("0123456789abcdef0123456789abcdef\n"), 0o600)
	out.Reset()
	errOut.Reset()
	if err := run(t.Context(), []string{"--check-config", "--api-key-file", keyFile}, noEnv, nil, &out, &errOut); err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(out.String(), "configuration OK: 1 key, upstream") || strings.Contains(out.String()+errOut.String(), "OFF") {
		t.Errorf("with a key: %q, log %q", out.String(), errOut.String())
	}
}

// TestGitIgnoresQuickStartFiles pins issue #15 item 4: the Quick start
// writes keys.txt and builds comfygate in the repository root, and git
// offered to commit both.
func TestGitIgnoresQuickStartFiles(t *testing.T) {
	if _, err := exec.LookPath("git"); err != nil {
		t.Skip("no git")
	}
	root := filepath.Join("..", "..")
	if _, err := os.Stat(filepath.Join(root, ".git")); err != nil {
		t.Skip("not a git checkout")
	}
	for _, f := range []string{"keys.txt", "comfygate", "comfygate.exe", "comfyui-sim", "examples/keys.txt"} {
		// check-ignore --no-index reads .gitignore without the file existing.
		if err := exec.Command("git", "-C", root, "check-ignore", "-q", "--no-index", f).Run(); err != nil {
			t.Errorf("git does not ignore %s: %v", f, err)
		}
	}
	if err := exec.Command("git", "-C", root, "check-ignore", "-q", "--no-index", "cmd/comfygate/main.go").Run(); err == nil {
		t.Error("git ignores cmd/comfygate/main.go")
	}
}
