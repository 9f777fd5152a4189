package server

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/coder/websocket"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/prometheus/client_golang/prometheus/testutil/promlint"

	"github.com/comfygate/comfygate/internal/auth"
	"github.com/comfygate/comfygate/internal/comfytest"
)

func scrape(t *testing.T, url string, header ...string) string {
	t.Helper()
	resp, body := do(t, "GET", url, nil, header...)
	if resp.StatusCode != 200 {
		t.Fatalf("scrape %s: %d %s", url, resp.StatusCode, body)
	}
	return string(body)
}

// TestMetricsMove drives traffic and checks that the counters and gauges
// moved as they should, and that no label holds a key or a raw path.
func TestMetricsMove(t *testing.T) {
	g := start(t, comfytest.Options{}, "--api-key-file", teamKeyFile(t), "--lockout-attempts", "0", "--key-prompt-limit", "1")
	reg := g.Server.Metrics().Registry()

	prompt := `{"prompt":{"1":{"class_type":"EmptyImage","inputs":{"width":8,"height":8,"batch_size":1,"color":0}},"2":{"class_type":"SaveImage","inputs":{"images":["1",0],"filename_prefix":"x"}}}}`
	do(t, "POST", g.URL+"/api/prompt", strings.NewReader(prompt), "X-API-Key", submitKey)
	do(t, "POST", g.URL+"/api/prompt", strings.NewReader(prompt), "X-API-Key", submitKey) // over the prompt limit
	do(t, "GET", g.URL+"/api/history/abc-123-secret-id", nil, "X-API-Key", readKey)
	do(t, "GET", g.URL+"/view?filename=gw_probe_207800_00001_.png&type=output", nil, "X-API-Key", readKey)
	do(t, "GET", g.URL+"/api/queue", nil)                                           // missing
	do(t, "GET", g.URL+"/api/queue?api_key=wrong-"+adminKey, nil)                   // invalid
	do(t, "POST", g.URL+"/api/free", strings.NewReader("{}"), "X-API-Key", readKey) // scope
	do(t, "GET", g.URL+"/custom/raw/path/"+adminKey, nil, "X-API-Key", adminKey)    // unknown route
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	c, _, err := dialWS(ctx, g, "/ws?clientId=m", nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	readJSON(t, ctx, c)

	checks := []struct {
		name string
		got  float64
		want float64
	}{
		{"prompt 200", testutil.ToFloat64(mustCounter(t, reg, "comfygate_http_requests_total", "route", "/prompt", "method", "POST", "code", "200")), 1},
		{"prompt 429", testutil.ToFloat64(mustCounter(t, reg, "comfygate_http_requests_total", "route", "/prompt", "method", "POST", "code", "429")), 1},
		{"history by pattern", testutil.ToFloat64(mustCounter(t, reg, "comfygate_http_requests_total", "route", "/history/{id}", "method", "GET", "code", "200")), 1},
		{"unknown route as other", testutil.ToFloat64(mustCounter(t, reg, "comfygate_http_requests_total", "route", "other", "method", "GET", "code", "404")), 1},
		{"auth missing", testutil.ToFloat64(mustCounter(t, reg, "comfygate_auth_failures_total", "reason", "missing")), 1},
		{"auth invalid", testutil.ToFloat64(mustCounter(t, reg, "comfygate_auth_failures_total", "reason", "invalid")), 1},
		{"auth scope", testutil.ToFloat64(mustCounter(t, reg, "comfygate_auth_failures_total", "reason", "scope")), 1},
		{"rate limited", testutil.ToFloat64(mustCounter(t, reg, "comfygate_auth_failures_total", "reason", "rate_limited")), 1},
		{"prompts per key", testutil.ToFloat64(mustCounter(t, reg, "comfygate_key_prompts_total", "key", "render-bot")), 1},
		{"requests per key", testutil.ToFloat64(mustCounter(t, reg, "comfygate_key_requests_total", "key", "viewer")), 3},
		{"websockets open", gaugeValue(t, reg, "comfygate_websockets_open"), 1},
		{"upstream up", gaugeValue(t, reg, "comfygate_upstream_up"), 1},
		{"keys loaded", gaugeValue(t, reg, "comfygate_keys_loaded"), 3},
	}
	for _, c := range checks {
		if c.got != c.want {
			t.Errorf("%s = %v; want %v", c.name, c.got, c.want)
		}
	}
	if n := testutil.CollectAndCount(reg, "comfygate_upstream_request_duration_seconds"); n == 0 {
		t.Error("no upstream latency observed")
	}
	if v := testutil.ToFloat64(mustCounter(t, reg, "comfygate_proxied_bytes_total", "direction", "out")); v < 485 {
		t.Errorf("bytes out %v: the 485-byte PNG alone is more", v)
	}
	c.Close(websocket.StatusNormalClosure, "")

	// Scraped over HTTP with a read key; the text holds no key, no hash
	// fragment, and no raw path.
	text := scrape(t, g.URL+"/metrics", "X-API-Key", readKey)
	for _, bad := range []string{readKey, submitKey, adminKey, auth.HashSecret(adminKey)[:12], "abc-123-secret-id", "/custom/raw", "gw_probe"} {
		if strings.Contains(text, bad) {
			t.Errorf("/metrics contains %q", bad)
		}
	}
	for _, want := range []string{"comfygate_build_info{version=\"test\"} 1", "go_goroutines", "process_cpu_seconds_total", "comfygate_comfyui_vram_total_bytes{device=\"cpu\"}"} {
		if !strings.Contains(text, want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
	if resp, _ := do(t, "GET", g.URL+"/metrics", nil); resp.StatusCode != 401 {
		t.Errorf("/metrics without a key: %d; want 401", resp.StatusCode)
	}

	problems, err := promlint.NewWithMetricFamilies(mustGather(t, g)).Lint()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		if strings.HasPrefix(p.Metric, "comfygate_") {
			t.Errorf("promlint: %s: %s", p.Metric, p.Text)
		}
	}
}

func TestMetricsListen(t *testing.T) {
	g := start(t, comfytest.Options{}, "--api-key-file", teamKeyFile(t), "--metrics-listen", "127.0.0.1:0")
	text := scrape(t, g.MetricsURL+"/metrics") // no key on the metrics port
	if !strings.Contains(text, "comfygate_http_requests_total") && !strings.Contains(text, "comfygate_upstream_up") {
		t.Errorf("metrics port: %s", text[:min(200, len(text))])
	}
	for _, p := range []string{"/health", "/health/live", "/health/ready"} {
		if resp, _ := do(t, "GET", g.MetricsURL+p, nil); resp.StatusCode != 200 {
			t.Errorf("metrics port %s: %d", p, resp.StatusCode)
		}
	}
	if resp, _ := do(t, "GET", g.MetricsURL+"/api/queue", nil); resp.StatusCode != 404 {
		t.Errorf("the metrics port proxied to ComfyUI: %d", resp.StatusCode)
	}
	// On the main port, /metrics is then ComfyUI's business (a 404 there).
	resp, _ := do(t, "GET", g.URL+"/metrics", nil, "X-API-Key", readKey)
	if resp.StatusCode != 404 {
		t.Errorf("main port /metrics with --metrics-listen: %d; want ComfyUI's 404", resp.StatusCode)
	}
}

func TestProbes(t *testing.T) {
	g := startTuned(t, comfytest.Options{}, noHealthSharing, "--api-key-file", teamKeyFile(t), "--max-queue", "3", "--metrics-interval", "100ms")
	probe := func(p string) (int, string) {
		resp, body := do(t, "GET", g.URL+p, nil)
		return resp.StatusCode, string(body)
	}
	if code, body := probe("/health/ready"); code != 200 || !strings.Contains(body, `"status":"ready"`) {
		t.Errorf("ready, idle: %d %s", code, body)
	}
	g.Fake.SetQueue(1, 2)
	eventually(t, 3*time.Second, "readiness did not see the full queue", func() bool {
		code, body := probe("/health/ready")
		return code == 503 && strings.Contains(body, "queue holds 3 prompts, at or above --max-queue 3")
	})
	if code, _ := probe("/health/live"); code != 200 {
		t.Errorf("live with a full queue: %d", code)
	}
	g.Fake.SetQueue(0, 2)
	eventually(t, 3*time.Second, "readiness did not recover", func() bool { code, _ := probe("/health/ready"); return code == 200 })

	g.Fake.Close() // ComfyUI goes away
	eventually(t, 3*time.Second, "readiness did not see ComfyUI down", func() bool {
		code, body := probe("/health/ready")
		return code == 503 && strings.Contains(body, "not reachable")
	})
	if code, body := probe("/health/live"); code != 200 || !strings.Contains(body, `"status":"alive"`) {
		t.Errorf("live with ComfyUI down: %d %s", code, body)
	}
	if v := gaugeValue(t, g.Server.Metrics().Registry(), "comfygate_upstream_up"); v != 0 {
		t.Errorf("upstream_up = %v with ComfyUI down", v)
	}
}

// TestBackgroundRefreshInterval: however often the probes and /metrics are
// hit, ComfyUI is checked once per interval. It runs in a synctest bubble
// with the fake ComfyUI in process, so the count is exact.
func TestBackgroundRefreshInterval(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		fake := comfytest.NewFake(comfytest.Options{})
		cfg := loadConfig(t, "--metrics-interval", "10s")
		srv, err := newServer(cfg, discardLogger(), "test", nil, inProcess(fake))
		if err != nil {
			t.Fatal(err)
		}
		srv.health.SetClient(&http.Client{Transport: inProcess(fake)})
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan struct{})
		go func() { srv.monitor.Run(ctx); close(done) }()
		h := srv.Handler()
		get := func(p string) {
			w := httptest.NewRecorder()
			h.ServeHTTP(w, httptest.NewRequest("GET", "http://gw"+p, nil))
		}
		// A minute of probes, 40 a second, and of scrapes, 4 a second (a
		// scrape reads /proc for the process metrics, which costs real time).
		for range 60 {
			for i := range 40 {
				get("/health/ready")
				get("/health/live")
				if i%10 == 0 {
					get("/metrics")
				}
			}
			time.Sleep(time.Second)
		}
		cancel()
		<-done
		// Checks at 0s, 10s, …, 60s; each reads /system_stats and /queue.
		if got := len(fake.Requests()); got != 2*7 {
			t.Errorf("ComfyUI got %d calls in a minute at a 10s interval; want 14", got)
		}
	})
}

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// inProcess is a transport to fake's handler, without sockets, for tests
// in a synctest bubble.
func inProcess(fake *comfytest.Fake) http.RoundTripper {
	return roundTripFunc(func(r *http.Request) (*http.Response, error) {
		if r.Body == nil {
			r.Body = http.NoBody // as a server request would have
		}
		w := httptest.NewRecorder()
		fake.ServeHTTP(w, r)
		return w.Result(), nil
	})
}
