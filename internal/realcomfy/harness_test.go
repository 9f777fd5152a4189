package realcomfy_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/comfygate/comfygate/internal/realcomfy"
)

// recorder is a realcomfy.TB that records how a helper ended the test.
type recorder struct {
	mu      sync.Mutex
	skipped string
	failed  string
}

func (r *recorder) Helper()                   {}
func (r *recorder) Cleanup(func())            {}
func (r *recorder) Logf(string, ...any)       {}
func (r *recorder) Skipf(f string, a ...any)  { r.end(&r.skipped, f, a) }
func (r *recorder) Fatalf(f string, a ...any) { r.end(&r.failed, f, a) }

func (r *recorder) end(into *string, f string, a []any) {
	r.mu.Lock()
	*into = fmt.Sprintf(f, a...)
	r.mu.Unlock()
	runtime.Goexit() // as testing.T does
}

// run calls f on its own goroutine, as a test body, and waits for it.
func (r *recorder) run(f func()) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		f()
	}()
	<-done
}

// TestMissingInstall: without an installation a test skips and says how to
// install one, unless CI or COMFYUI_REAL_REQUIRED promised one.
func TestMissingInstall(t *testing.T) {
	dir := t.TempDir()
	want := "real ComfyUI not installed at " + dir + " (no start-comfyui.sh); run ../shared/comfyui/real/install.sh " + dir
	for _, tt := range []struct {
		name, ci, required string
		fail               bool
	}{
		{"developer", "", "", false},
		{"CI", "true", "", true},
		{"required", "", "1", true},
		{"CI=false", "false", "0", false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			t.Setenv(realcomfy.EnvDir, dir)
			t.Setenv("CI", tt.ci)
			t.Setenv(realcomfy.EnvRequired, tt.required)
			var sh realcomfy.Shared
			for _, get := range []func(realcomfy.TB){
				func(tb realcomfy.TB) { realcomfy.Need(tb) },
				func(tb realcomfy.TB) { realcomfy.Start(tb, realcomfy.V080) },
				func(tb realcomfy.TB) { sh.Get(tb, realcomfy.V037) },
			} {
				rec := &recorder{}
				rec.run(func() { get(rec) })
				got, other := rec.skipped, rec.failed
				if tt.fail {
					got, other = rec.failed, rec.skipped
				}
				if !strings.HasPrefix(got, want) || other != "" {
					t.Errorf("skipped %q, failed %q; want it %s with %q", rec.skipped, rec.failed,
						map[bool]string{true: "failed", false: "skipped"}[tt.fail], want)
				}
			}
			if err := sh.Close(); err != nil {
				t.Error(err)
			}
		})
	}
}

// TestStopAndRestart stops a server under a running gateway, as a fleet
// test stops one of its servers, and starts it again on the same port.
func TestStopAndRestart(t *testing.T) {
	t.Parallel()
	comfy := realcomfy.Start(t, realcomfy.V080)[0]
	g := startGateway(t, comfy, "--metrics-interval", "200ms")

	// Something to find again after the restart: the folders stay.
	col := randomColor()
	id := g.queue(t, saveGraph(8, 8, col, "rc_restart"), "")
	var img fileRef
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		_, b := g.do(t, "GET", "/history/"+id, nil, g.key()...)
		var h map[string]historyEntry
		if json.Unmarshal(b, &h) == nil && h[id].Outputs["2"] != nil {
			img = h[id].image(t, "2")
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("prompt %s did not finish: %s", id, b)
		}
	}

	if err := comfy.Stop(); err != nil {
		t.Fatal(err)
	}
	if err := comfy.Stop(); err != nil {
		t.Errorf("second Stop: %v", err)
	}
	if _, err := http.Get(comfy.URL + "/system_stats"); err == nil {
		t.Errorf("ComfyUI still answers after Stop")
	}
	waitReady(t, g, 503)
	if resp, b := g.do(t, "GET", "/queue", nil, g.key()...); resp.StatusCode != http.StatusBadGateway {
		t.Errorf("GET /queue with ComfyUI down = %d %s; want 502", resp.StatusCode, b)
	}

	ctx, cancel := context.WithTimeout(t.Context(), realcomfy.StartTimeout)
	defer cancel()
	if err := comfy.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	if err := comfy.Restart(ctx); err == nil {
		t.Error("Restart of a running server succeeded")
	}
	waitReady(t, g, 200)
	checkPNG(t, g.view(t, img), 8, 8, col)
	if resp, b := g.do(t, "GET", "/history/"+id, nil, g.key()...); resp.StatusCode != 200 || string(b) != "{}" {
		t.Errorf("history after a restart = %d %s; want it forgotten", resp.StatusCode, b)
	}
}

// waitReady polls the gateway's readiness probe until it answers status.
func waitReady(t *testing.T, g *gateway, status int) {
	t.Helper()
	var last int
	for deadline := time.Now().Add(15 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		resp, _ := g.do(t, "GET", "/health/ready", nil)
		if last = resp.StatusCode; last == status {
			return
		}
	}
	t.Fatalf("/health/ready = %d; want %d", last, status)
}
