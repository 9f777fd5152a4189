package main

import (
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

func TestRawClient(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n, _ := io.Copy(io.Discard, r.Body)
		switch r.URL.Path {
		case "/chunked":
			w.Write([]byte("hello "))
			w.(http.Flusher).Flush()
			w.Write([]byte("world"))
		case "/close":
			w.Header().Set("Connection", "close")
			io.WriteString(w, "bye")
		default:
			w.Header().Set("X-Upstream-Saw-Key", "yes")
			io.WriteString(w, strings.Repeat("x", int(n)))
		}
	}))
	defer srv.Close()
	addr := strings.TrimPrefix(srv.URL, "http://")
	rc := newRawConn(addr)
	defer rc.close()
	deadline := time.Now().Add(5 * time.Second)
	for _, tc := range []struct {
		method, path string
		body         []byte
		want         int64
		sawKey       bool
	}{
		{"GET", "/chunked", nil, 11, false},
		{"POST", "/len", []byte(strings.Repeat("a", 5000)), 5000, true},
		{"GET", "/close", nil, 3, false},
		{"GET", "/chunked", nil, 11, false}, // redials after Connection: close
	} {
		r, err := rc.do(buildRequest(tc.method, addr, tc.path, []string{"X-Test: 1"}, tc.body), deadline)
		if err != nil || r.status != 200 || r.bytes != tc.want || r.sawKey != tc.sawKey {
			t.Fatalf("%s %s: %+v, %v", tc.method, tc.path, r, err)
		}
	}
}

func TestReport(t *testing.T) {
	res := &Results{
		Meta:     map[string]string{"cpu": "test", "nproc": "2"},
		Settings: Settings{Reps: 2, Concurrency: []int{1, 16}, IdleSockets: 10},
		Targets: []*Target{
			{Name: "direct", Kind: "direct"},
			{Name: "comfygate", Kind: "comfygate"},
			{Name: "comfygate-key", Kind: "comfygate", Auth: true},
			{Name: "nginx", Kind: "nginx"},
		},
	}
	for rep := 1; rep <= 2; rep++ {
		for i, tg := range res.Targets {
			f := float64(i + rep)
			for _, sc := range []string{"get-c1", "get-c16", "view8m"} {
				res.Measurements = append(res.Measurements, Measurement{Rep: rep, Scenario: sc, Target: tg.Name,
					Metrics: map[string]float64{"p50_us": 50 * f, "rps": 1000 / f, "proxy_cpu_us": 10 * f, "mib_s": 1000 / f}})
			}
			res.Measurements = append(res.Measurements, Measurement{Rep: rep, Scenario: "ws-idle", Target: tg.Name,
				Metrics: map[string]float64{"kib_per_ws": f, "upstream_kib_per_ws": 1}})
		}
	}
	a := newAgg(res)
	md := a.markdown("benchmarks.svg", "")
	for _, want := range []string{"## Summary", "| **comfygate** |", "Against the targets of issue 6", "Key check < 2 µs"} {
		if !strings.Contains(md, want) {
			t.Errorf("markdown lacks %q", want)
		}
	}
	if svg := a.chart(); !strings.HasPrefix(svg, "<svg") || !strings.Contains(svg, "comfygate-key") {
		t.Errorf("bad chart: %.200s", svg)
	}
	if got := a.get("get-c1", "comfygate", "p50_us"); got.mean != 125 || got.spread != 0.4 {
		t.Errorf("aggregate: %+v", got)
	}
}

func TestLoopbackOnly(t *testing.T) {
	for _, bad := range []string{"0.0.0.0:1", "10.0.0.1:1", ":1", "example.com:80"} {
		if checkLoopback(bad) == nil {
			t.Errorf("%s accepted", bad)
		}
	}
	if err := checkLoopback("127.0.0.1:8189"); err != nil {
		t.Error(err)
	}
}
