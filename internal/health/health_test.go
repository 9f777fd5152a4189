package health

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"net"
	"net/url"
	"sync"
	"testing"
	"time"

	"github.com/comfygate/comfygate/internal/comfytest"
)

// clock is a settable time source for Options.Now.
type clock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}

// syncBuffer is a bytes.Buffer safe for the logger and the test at once.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

// lines returns the JSON log lines written so far, and forgets them.
func (s *syncBuffer) lines(t *testing.T) []map[string]any {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []map[string]any
	sc := bufio.NewScanner(&s.b)
	for sc.Scan() {
		var m map[string]any
		if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
			t.Fatalf("log line %q: %v", sc.Text(), err)
		}
		out = append(out, m)
	}
	s.b.Reset()
	return out
}

func newTestChecker(t *testing.T, base string, clk *clock, logs *syncBuffer) *Checker {
	t.Helper()
	u, err := url.Parse(base)
	if err != nil {
		t.Fatal(err)
	}
	return New(u, Options{
		Timeout: 2 * time.Second,
		TTL:     time.Second,
		Now:     clk.Now,
		Logger:  slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	})
}

// atLeast keeps the lines at level info or above.
func atLeast(lines []map[string]any, levels ...string) []map[string]any {
	var out []map[string]any
	for _, l := range lines {
		for _, lv := range levels {
			if l["level"] == lv {
				out = append(out, l)
			}
		}
	}
	return out
}

// TestHealthLogsStateChanges pins issue #15 item 7: while ComfyUI was down,
// every check (the background monitor's every 5 s, and every /health) logged
// a full warning, 127 lines in ten minutes. Now the log hears that ComfyUI
// went down (warn), that it is still down every 5 minutes (warn, with how
// long), and that it is up again (info, with the downtime); each failed check
// is a debug line. The clock is injected: ten minutes pass without sleeping.
func TestHealthLogsStateChanges(t *testing.T) {
	fake := comfytest.New(t, comfytest.Options{})
	clk := &clock{now: time.Date(2026, 11, 28, 4, 0, 0, 0, time.UTC)}
	var logs syncBuffer
	c := newTestChecker(t, fake.URL(), clk, &logs)
	ctx := t.Context()

	if rep := c.Check(ctx); !rep.Healthy() {
		t.Fatalf("first check: %+v", rep)
	}
	if got := atLeast(logs.lines(t), "INFO", "WARN", "ERROR"); len(got) != 0 {
		t.Errorf("a healthy ComfyUI was logged: %v", got)
	}

	// ComfyUI starts failing, and is checked every 5 s for 10 minutes.
	fake.SetResponse("/system_stats", 500, "text/plain", []byte("boom"))
	const every = 5 * time.Second
	checks := 0
	for elapsed := time.Duration(0); elapsed <= 10*time.Minute; elapsed += every {
		clk.Advance(every)
		if rep := c.Check(ctx); rep.Healthy() {
			t.Fatalf("check at %s is healthy", elapsed)
		}
		checks++
	}
	lines := logs.lines(t)
	loud := atLeast(lines, "INFO", "WARN", "ERROR")
	if len(loud) != 3 {
		t.Fatalf("%d checks while down gave %d lines at info or above; want 3 (down, still down at 5m and 10m):\n%v", checks, len(loud), loud)
	}
	if loud[0]["level"] != "WARN" || loud[0]["msg"] != "ComfyUI is down: health check failed" ||
		loud[0]["reason"] != "ComfyUI answered /system_stats with status 500" || loud[0]["err"] == nil || loud[0]["upstream"] != fake.URL() {
		t.Errorf("first line = %v", loud[0])
	}
	for i, want := range []string{"5m0s", "10m0s"} {
		l := loud[i+1]
		if l["level"] != "WARN" || l["msg"] != "ComfyUI is still down" || l["down_for"] != want || l["reason"] == nil {
			t.Errorf("reminder %d = %v; want still down for %s", i+1, l, want)
		}
	}
	if debug := atLeast(lines, "DEBUG"); len(debug) != checks-3 {
		t.Errorf("%d debug lines; want one per other failed check (%d)", len(debug), checks-3)
	}

	// ComfyUI comes back: one info line with the downtime.
	fake.ClearOverrides()
	clk.Advance(every)
	if rep := c.Check(ctx); !rep.Healthy() {
		t.Fatalf("check after recovery: %+v", rep)
	}
	clk.Advance(every)
	c.Check(ctx)
	loud = atLeast(logs.lines(t), "DEBUG", "INFO", "WARN", "ERROR")
	if len(loud) != 1 || loud[0]["level"] != "INFO" || loud[0]["msg"] != "ComfyUI is up again" ||
		loud[0]["down_for"] != "10m5s" || loud[0]["failed_checks"] != float64(checks) {
		t.Errorf("after recovery: %v; want one info line, down for 10m5s after %d checks", loud, checks)
	}

	// A new outage is new news.
	fake.SetResponse("/queue", 503, "text/plain", nil)
	clk.Advance(every)
	c.Check(ctx)
	if loud := atLeast(logs.lines(t), "WARN"); len(loud) != 1 || loud[0]["msg"] != "ComfyUI is down: health check failed" {
		t.Errorf("second outage: %v", loud)
	}
}

// TestHealthUnreachableLoggedOnce: a ComfyUI that refuses connections (not
// started yet) gives one warning with the detail, not one per check; a
// caller that hangs up is not an outage at all.
func TestHealthUnreachableLoggedOnce(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := "http://" + ln.Addr().String()
	ln.Close()
	clk := &clock{now: time.Date(2026, 11, 28, 4, 0, 0, 0, time.UTC)}
	var logs syncBuffer
	c := newTestChecker(t, dead, clk, &logs)
	for range 10 {
		clk.Advance(2 * time.Second)
		if rep := c.Check(t.Context()); rep.Healthy() || rep.Error != "ComfyUI is not reachable" {
			t.Fatalf("report = %+v", rep)
		}
	}
	warns := atLeast(logs.lines(t), "WARN")
	if len(warns) != 1 || warns[0]["reason"] != "ComfyUI is not reachable" || warns[0]["err"] == nil {
		t.Errorf("warnings = %v; want one, with the error", warns)
	}

	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if rep := c.unhealthy("the health check was cancelled", ctx.Err()); rep.Healthy() {
		t.Fatal("cancelled report is healthy")
	}
	if got := logs.lines(t); len(got) != 0 {
		t.Errorf("building a cancelled report logged %v", got)
	}
}
