package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"
)

// demoInstructions is what the demo printed, read back as a user would.
type demoInstructions struct {
	key, login, promptURL, workflow, health, metrics, dir string
	stdout                                                string
}

var (
	demoKeyRE      = regexp.MustCompile(`(?m)^  API key     (cg_[A-Za-z0-9_-]{43})$`)
	demoLoginRE    = regexp.MustCompile(`(?m)^    (http://\S+/login)$`)
	demoCurlRE     = regexp.MustCompile(`(?m)^    curl -H "Authorization: Bearer (\S+)" -H "Content-Type: application/json" --data-binary "@([^"]+)" (http://\S+/prompt)$`)
	demoNoKeyRE    = regexp.MustCompile(`(?m)^    curl -i -H "Content-Type: application/json" --data-binary "@[^"]+" (http://\S+/prompt)$`)
	demoHealthRE   = regexp.MustCompile(`(?m)^    curl (http://\S+/health)$`)
	demoMetricsRE  = regexp.MustCompile(`(?m)^    curl -H "Authorization: Bearer \S+" (http://\S+/metrics)$`)
	demoStopRE     = regexp.MustCompile(`(?m)^Press Ctrl-C to stop the demo; it then deletes (.+)$`)
	demoSimulation = "This is a SIMULATION"
)

func parseDemo(t *testing.T, out string) demoInstructions {
	t.Helper()
	find := func(re *regexp.Regexp, what string) []string {
		t.Helper()
		m := re.FindStringSubmatch(out)
		if m == nil {
			t.Fatalf("the demo printed no %s:\n%s", what, out)
		}
		return m
	}
	d := demoInstructions{stdout: out}
	d.key = find(demoKeyRE, "API key")[1]
	d.login = find(demoLoginRE, "login URL")[1]
	curl := find(demoCurlRE, "curl that queues the workflow")
	if curl[1] != d.key {
		t.Errorf("the curl sends %q, not the key", curl[1])
	}
	d.workflow, d.promptURL = curl[2], curl[3]
	if noKey := find(demoNoKeyRE, "curl without the key")[1]; noKey != d.promptURL {
		t.Errorf("the two curls differ: %s, %s", noKey, d.promptURL)
	}
	d.health = find(demoHealthRE, "health URL")[1]
	d.metrics = find(demoMetricsRE, "metrics URL")[1]
	d.dir = find(demoStopRE, "last line")[1]
	if !strings.Contains(out, demoSimulation) {
		t.Errorf("the demo does not say it is a simulation:\n%s", out)
	}
	return d
}

// TestDemo pins issue #16: "comfygate demo", the README's first command,
// works on its own. It builds the binary, starts the demo as a user would,
// reads the instructions it prints and follows them over real HTTP, then
// stops it with Ctrl-C (SIGINT) and checks that it exits 0 and leaves no
// temporary files behind.
func TestDemo(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	bin := buildBinary(t)

	cmd := exec.Command(bin, "demo", "--listen", "127.0.0.1:0")
	// The caller's COMFYGATE_ variables would change or stop the demo.
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(strings.ToUpper(kv), "COMFYGATE_") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	var stderr syncBuffer
	cmd.Stderr = &stderr
	stdoutPipe, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
			<-exited
		}
	})

	// Read up to the last line of the instructions.
	lines := make(chan string, 100)
	go func() {
		defer close(lines)
		sc := bufio.NewScanner(stdoutPipe)
		for sc.Scan() {
			lines <- sc.Text()
		}
	}()
	var printed strings.Builder
	deadline := time.After(30 * time.Second)
read:
	for {
		select {
		case line, ok := <-lines:
			if !ok {
				t.Fatalf("the demo ended before its instructions were complete:\n%s\nstderr:\n%s", printed.String(), stderr.String())
			}
			printed.WriteString(line + "\n")
			if demoStopRE.MatchString(line) {
				break read
			}
		case <-deadline:
			t.Fatalf("no instructions after 30s:\n%s\nstderr:\n%s", printed.String(), stderr.String())
		}
	}
	// cmd.Wait closes the pipe, so it runs only after the reader saw its end.
	var rest syncBuffer // standard output after the instructions
	go func() {
		<-exitedReader(lines, &rest)
		exited <- cmd.Wait()
	}()
	d := parseDemo(t, printed.String())

	// The key file on disk holds only the key's hash.
	keyFile, err := os.ReadFile(filepath.Join(d.dir, "keys.txt"))
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(keyFile, []byte(d.key)) {
		t.Error("the key file holds the key itself")
	}

	client := &http.Client{
		Timeout:       10 * time.Second,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	do := func(method, u string, body []byte, header ...string) (*http.Response, []byte) {
		t.Helper()
		req, err := http.NewRequest(method, u, bytes.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		for i := 0; i+1 < len(header); i += 2 {
			req.Header.Set(header[i], header[i+1])
		}
		resp, err := client.Do(req)
		if err != nil {
			t.Fatalf("%s %s: %v", method, u, err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		return resp, b
	}

	// The curl that queues the example workflow, with the file it names.
	workflow, err := os.ReadFile(d.workflow)
	if err != nil {
		t.Fatalf("the workflow the curl sends: %v", err)
	}
	resp, body := do("POST", d.promptURL, workflow, "Authorization", "Bearer "+d.key, "Content-Type", "application/json")
	var queued struct {
		PromptID string `json:"prompt_id"`
	}
	if resp.StatusCode != 200 || json.Unmarshal(body, &queued) != nil || queued.PromptID == "" {
		t.Errorf("queueing the workflow with the key: %d %s", resp.StatusCode, body)
	}
	// The same without the key.
	if resp, body := do("POST", d.promptURL, workflow, "Content-Type", "application/json"); resp.StatusCode != 401 {
		t.Errorf("without the key: %d %s", resp.StatusCode, body)
	}

	// The browser's way: sign in on the login page, then use the cookie.
	base := strings.TrimSuffix(d.login, "/login")
	form := url.Values{"key": {d.key}}.Encode()
	resp, body = do("POST", d.login, []byte(form), "Content-Type", "application/x-www-form-urlencoded", "Origin", base)
	var cookie *http.Cookie
	for _, c := range resp.Cookies() {
		if c.Name == "comfygate_session" {
			cookie = c
		}
	}
	if resp.StatusCode != http.StatusSeeOther || cookie == nil {
		t.Fatalf("sign-in: %d %v %s", resp.StatusCode, resp.Cookies(), body)
	}
	if resp, body := do("GET", base+"/api/queue", nil, "Cookie", cookie.Name+"="+cookie.Value); resp.StatusCode != 200 {
		t.Errorf("GET /api/queue with the session cookie: %d %s", resp.StatusCode, body)
	}
	if resp, _ := do("GET", base+"/api/queue", nil); resp.StatusCode != 401 {
		t.Errorf("GET /api/queue without the cookie: %d", resp.StatusCode)
	}

	// /health without a key, and /metrics with it.
	resp, body = do("GET", d.health, nil)
	var health struct{ Status, Version string }
	if resp.StatusCode != 200 || json.Unmarshal(body, &health) != nil || health.Status != "healthy" || health.Version != demoSimVersion {
		t.Errorf("/health: %d %s", resp.StatusCode, body)
	}
	if resp, body := do("GET", d.metrics, nil, "Authorization", "Bearer "+d.key); resp.StatusCode != 200 || !bytes.Contains(body, []byte("comfygate_")) {
		t.Errorf("/metrics: %d %.200s", resp.StatusCode, body)
	}

	if runtime.GOOS == "windows" {
		t.Skip("no SIGINT to send on Windows; the rest was checked")
	}
	if err := cmd.Process.Signal(os.Interrupt); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-exited:
		if err != nil {
			t.Errorf("the demo exited with %v after SIGINT; want 0\nstderr:\n%s", err, stderr.String())
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the demo did not stop within 20s of SIGINT")
	}
	if _, err := os.Stat(d.dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the demo left %s behind (stat: %v)", d.dir, err)
	}
	if !strings.Contains(rest.String(), "comfygate demo stopped; removed "+d.dir) {
		t.Errorf("after SIGINT the demo printed %q", rest.String())
	}
	// The key is printed once, on the terminal, and never logged.
	if strings.Contains(stderr.String(), d.key) {
		t.Error("the demo's log holds the key")
	}
	if n := strings.Count(d.stdout, d.key); n != 3 {
		t.Errorf("the key appears %d times in the instructions; want 3 (the key, two curls)", n)
	}
}

var built struct {
	once sync.Once
	dir  string
	bin  string
	err  error
	out  []byte
}

func TestMain(m *testing.M) {
	code := m.Run()
	if built.dir != "" {
		os.RemoveAll(built.dir)
	}
	os.Exit(code)
}

// buildBinary builds comfygate once per test run and returns its path.
func buildBinary(t *testing.T) string {
	t.Helper()
	built.once.Do(func() {
		built.dir, built.err = os.MkdirTemp("", "comfygate-test-")
		if built.err != nil {
			return
		}
		built.bin = filepath.Join(built.dir, "comfygate")
		if runtime.GOOS == "windows" {
			built.bin += ".exe"
		}
		built.out, built.err = exec.Command("go", "build", "-o", built.bin, ".").CombinedOutput()
	})
	if built.err != nil {
		t.Fatalf("go build: %v\n%s", built.err, built.out)
	}
	return built.bin
}

// exitedReader copies the remaining lines into rest; the channel it returns
// closes when lines is closed (the process closed its standard output).
func exitedReader(lines <-chan string, rest *syncBuffer) <-chan struct{} {
	done := make(chan struct{})
	go func() {
		defer close(done)
		for line := range lines {
			rest.Write([]byte(line + "\n"))
		}
	}()
	return done
}

// syncBuffer is a bytes.Buffer that a process and the test may use at once.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestDemoRefusesRealUse: an upstream or a key, by flag or variable, means
// the user expects a real ComfyUI or their own key; the demo would give
// neither, so it stops and says how to run either.
func TestDemoRefusesRealUse(t *testing.T) {
	tests := []struct {
		args, env []string
		want      string
	}{
		{[]string{"demo", "--upstream", "http://127.0.0.1:8189"}, nil, "--upstream set"},
		{[]string{"demo", "--api-key", "abc"}, nil, "--api-key set"},
		{[]string{"demo", "--api-key-file", "keys.txt"}, nil, "--api-key-file set"},
		{[]string{"demo"}, []string{"COMFYGATE_API_KEY=abc"}, "COMFYGATE_API_KEY set"},
		{[]string{"demo"}, []string{"PATH=/bin", "COMFYGATE_API_KEY_FILE=keys.txt", "COMFYGATE_UPSTREAM=http://x"}, "COMFYGATE_API_KEY_FILE, COMFYGATE_UPSTREAM set"},
	}
	for _, tt := range tests {
		var out, errOut bytes.Buffer
		err := run(t.Context(), tt.args, tt.env, nil, &out, &errOut)
		if !errors.Is(err, errUsage) || !strings.Contains(errOut.String(), "refusing to start: "+tt.want) ||
			!strings.Contains(errOut.String(), "comfygate --upstream http://127.0.0.1:8189 --api-key-file keys.txt") {
			t.Errorf("%q %q: err %v, stderr %q", tt.args, tt.env, err, errOut.String())
		}
		if out.Len() != 0 {
			t.Errorf("%q: printed %q", tt.args, out.String())
		}
	}
	var out, errOut bytes.Buffer
	if err := run(t.Context(), []string{"demo", "--port", "1"}, nil, nil, &out, &errOut); !errors.Is(err, errUsage) || !strings.Contains(errOut.String(), "Usage:") {
		t.Errorf("unknown demo flag: %v %q", err, errOut.String())
	}
	out.Reset()
	if err := run(t.Context(), []string{"demo", "--help"}, nil, nil, &out, &errOut); err != nil || !strings.Contains(out.String(), "SIMULATED") {
		t.Errorf("demo --help: %v %q", err, out.String())
	}
}

// TestDemoDefaultPortBusy: with its default port taken (ComfyUI still on
// 8188, say), the demo says so and runs on a free port; a port asked for
// with --listen is not replaced.
func TestDemoDefaultPortBusy(t *testing.T) {
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	old := defaultDemoListen
	defaultDemoListen = busy.Addr().String()
	t.Cleanup(func() { defaultDemoListen = old })

	var out, errOut syncBuffer
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- run(ctx, []string{"demo"}, []string{"COMFYGATE_LOG_LEVEL=debug"}, nil, &out, &errOut) }()
	var printed string
	for range 200 {
		if printed = out.String(); demoStopRE.MatchString(printed) {
			break
		}
		time.Sleep(25 * time.Millisecond)
	}
	d := parseDemo(t, printed)
	if !strings.Contains(printed, "Note: "+busy.Addr().String()+" is not available") || strings.Contains(d.health, busy.Addr().String()) {
		t.Errorf("no note about the busy port, or the busy port used:\n%s", printed)
	}
	if !strings.Contains(printed, "Note: COMFYGATE_LOG_LEVEL is set; the demo ignores COMFYGATE_* variables.") {
		t.Errorf("no note about the ignored variable:\n%s", printed)
	}
	resp, err := http.Get(d.health)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Errorf("/health on the free port: %d", resp.StatusCode)
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("run: %v", err)
	}
	if _, err := os.Stat(d.dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("%s left behind", d.dir)
	}

	// Asked for explicitly: an error that says what to do.
	err = run(t.Context(), []string{"demo", "--listen", busy.Addr().String()}, nil, nil, io.Discard, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "cannot listen on "+busy.Addr().String()) || !strings.Contains(err.Error(), "--listen 127.0.0.1:0") {
		t.Errorf("explicit busy --listen: %v", err)
	}
}

// TestDemoWorkflowIsTheExample keeps the demo's embedded workflow equal to
// examples/workflow_api.json, which the README and the examples use.
func TestDemoWorkflowIsTheExample(t *testing.T) {
	want, err := os.ReadFile(filepath.Join("..", "..", "examples", "workflow_api.json"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(want, demoWorkflow) {
		t.Error("cmd/comfygate/demo_workflow.json differs from examples/workflow_api.json; copy it over")
	}
	// Issue #15 item 8: the example carried leftovers of a capture session
	// (filename_prefix gw_probe_207800, client_id "test", note "gateway
	// probe"), which users then saw in their output folders.
	var w struct {
		Prompt   map[string]struct{ Inputs map[string]any } `json:"prompt"`
		ClientID string                                     `json:"client_id"`
	}
	if err := json.Unmarshal(want, &w); err != nil {
		t.Fatal(err)
	}
	if got := w.Prompt["3"].Inputs["filename_prefix"]; got != "comfygate_example" || w.ClientID != "comfygate-example" {
		t.Errorf("filename_prefix %v, client_id %q", got, w.ClientID)
	}
	if bytes.Contains(want, []byte("probe")) {
		t.Error("the example still mentions a probe")
	}
}
