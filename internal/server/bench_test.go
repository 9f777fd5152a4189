package server

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/comfygate/comfygate/internal/auth"
	"github.com/comfygate/comfygate/internal/route"
)

// Benchmarks in two tiers (see docs/benchmarks.md):
//
//   BenchmarkChain_*  in process: the whole handler chain with a canned
//                     upstream response, so only comfygate's own work counts.
//   BenchmarkE2E_*    loopback: client -> comfygate -> upstream over real
//                     TCP, against the same client going direct.
//
// Run: go test -run '^$' -bench . -benchmem -count 6 ./internal/server

const smallJSON = `{"exec_info": {"queue_remaining": 0}}`

// staticTransport answers every request with smallJSON without a network.
type staticTransport struct{}

func (staticTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	if r.Body != nil {
		io.Copy(io.Discard, r.Body)
		r.Body.Close()
	}
	return &http.Response{
		StatusCode:    200,
		ProtoMajor:    1,
		ProtoMinor:    1,
		Header:        http.Header{"Content-Type": {"application/json; charset=utf-8"}},
		Body:          io.NopCloser(strings.NewReader(smallJSON)),
		ContentLength: int64(len(smallJSON)),
		Request:       r,
	}, nil
}

func benchChain(b *testing.B, args []string, header http.Header) {
	cfg := benchConfig(b, args...)
	srv, err := newServer(cfg, slog.New(slog.DiscardHandler), "bench", io.Discard, staticTransport{})
	if err != nil {
		b.Fatal(err)
	}
	h := srv.Handler()
	req := httptest.NewRequest("GET", "http://127.0.0.1:8188/api/prompt?clientId=abc", nil)
	req.Header = header
	b.ReportAllocs()
	for b.Loop() {
		w := httptest.NewRecorder()
		h.ServeHTTP(w, req)
		if w.Code != 200 {
			b.Fatalf("status %d", w.Code)
		}
	}
}

func BenchmarkChain_NoKey(b *testing.B) {
	benchChain(b, nil, http.Header{})
}

func BenchmarkChain_Bearer(b *testing.B) {
	benchChain(b, []string{"--api-key-file", benchKeyFile(b)}, http.Header{"Authorization": {"Bearer " + testKey2}})
}

func BenchmarkChain_QueryKey(b *testing.B) {
	cfg := benchConfig(b, "--api-key-file", benchKeyFile(b))
	srv, err := newServer(cfg, slog.New(slog.DiscardHandler), "bench", io.Discard, staticTransport{})
	if err != nil {
		b.Fatal(err)
	}
	h := srv.Handler()
	req := httptest.NewRequest("GET", "http://127.0.0.1:8188/api/view?filename=a.png&type=output&api_key="+testKey2, nil)
	b.ReportAllocs()
	for b.Loop() {
		w := httptest.NewRecorder()
		h.ServeHTTP(w, req)
	}
}

// The difference of BenchmarkChain_Bearer and BenchmarkChain_NoKey is the
// added cost of authentication in the chain (lookup, strip, scope). The
// BenchmarkKeyCheck_* below take it apart, calling package auth's pieces in
// the order its middleware and the proxy's rewrite call them.

func keyCheckRequest() *http.Request {
	req := httptest.NewRequest("GET", "http://127.0.0.1:8188/api/prompt?clientId=abc", nil)
	req.Header.Set("Authorization", "Bearer "+testKey2)
	return req
}

// BenchmarkKeyCheck_All is everything the key adds to one request.
func BenchmarkKeyCheck_All(b *testing.B) {
	ks := auth.NewKeySet(auth.NewKey("bench", testKey2))
	req := keyCheckRequest()
	b.ReportAllocs()
	for b.Loop() {
		creds := auth.Credentials(req)
		if _, ok := ks.Lookup(creds[0].Value); !ok {
			b.Fatal("key not found")
		}
		if route.Classify(req, true).Access != route.Protected { // the scope comes with it
			b.Fatal("not protected")
		}
		out := req.Clone(req.Context()) // what ReverseProxy does anyway
		auth.Strip(out)
	}
}

func BenchmarkKeyCheck_Credentials(b *testing.B) {
	req := keyCheckRequest()
	b.ReportAllocs()
	for b.Loop() {
		auth.Credentials(req)
	}
}

func BenchmarkKeyCheck_Lookup(b *testing.B) {
	ks := auth.NewKeySet(auth.NewKey("bench", testKey2))
	b.ReportAllocs()
	for b.Loop() {
		ks.Lookup(testKey2)
	}
}

func BenchmarkKeyCheck_ClassifyScope(b *testing.B) {
	req := keyCheckRequest()
	b.ReportAllocs()
	for b.Loop() {
		route.Classify(req, true)
	}
}

func BenchmarkKeyCheck_Strip(b *testing.B) {
	req := keyCheckRequest()
	b.ReportAllocs()
	for b.Loop() {
		b.StopTimer()
		out := req.Clone(req.Context())
		b.StartTimer()
		auth.Strip(out)
	}
}

// E2E: a fast upstream, a real gateway, a real client.

func fastUpstream(b *testing.B) *httptest.Server {
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "application/json; charset=utf-8")
		io.WriteString(w, smallJSON)
	}))
	srv.Config.ErrorLog = nil
	srv.Start()
	b.Cleanup(srv.Close)
	return srv
}

func benchGateway(b *testing.B, upstream string, args ...string) string {
	cfg := benchConfig(b, append([]string{"--upstream", upstream}, args...)...)
	s, err := New(cfg, slog.New(slog.DiscardHandler), "bench", io.Discard)
	if err != nil {
		b.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	// The production path: h1 in front, net/http behind it.
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, []net.Listener{ln}, nil) }()
	b.Cleanup(func() {
		cancel()
		<-done
	})
	return "http://" + ln.Addr().String()
}

// e2e measures sequential requests (concurrency 1): per-request latency
// percentiles and process CPU per request (client, gateway and upstream
// together; subtract the Direct figure for the gateway's share).
func e2e(b *testing.B, url string, header http.Header, body []byte) {
	c := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64, DisableCompression: true}}
	b.Cleanup(c.CloseIdleConnections)
	method := "GET"
	if body != nil {
		method = "POST"
	}
	lat := make([]time.Duration, 0, 1<<16)
	cpu0 := cpuTime()
	b.ResetTimer()
	for b.Loop() {
		var rd io.Reader
		if body != nil {
			rd = bytes.NewReader(body)
		}
		req, _ := http.NewRequest(method, url, rd)
		req.Header = header.Clone()
		t0 := time.Now()
		resp, err := c.Do(req)
		if err != nil {
			b.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		lat = append(lat, time.Since(t0))
		if resp.StatusCode != 200 {
			b.Fatalf("status %d", resp.StatusCode)
		}
	}
	b.StopTimer()
	n := len(lat)
	slices.Sort(lat)
	b.ReportMetric(float64(lat[n/2].Microseconds()), "p50-µs")
	b.ReportMetric(float64(lat[n*99/100].Microseconds()), "p99-µs")
	b.ReportMetric(float64((cpuTime()-cpu0).Microseconds())/float64(n), "cpu-µs/op")
}

func BenchmarkE2E_Direct(b *testing.B) {
	up := fastUpstream(b)
	e2e(b, up.URL+"/api/prompt", http.Header{}, nil)
}

func BenchmarkE2E_GatewayNoKey(b *testing.B) {
	up := fastUpstream(b)
	gw := benchGateway(b, up.URL)
	e2e(b, gw+"/api/prompt", http.Header{}, nil)
}

func BenchmarkE2E_GatewayKey(b *testing.B) {
	up := fastUpstream(b)
	gw := benchGateway(b, up.URL, "--api-key-file", benchKeyFile(b))
	e2e(b, gw+"/api/prompt", http.Header{"X-Api-Key": {testKey2}}, nil)
}

func BenchmarkE2E_DirectPrompt50KB(b *testing.B) {
	up := fastUpstream(b)
	e2e(b, up.URL+"/api/prompt", http.Header{}, bytes.Repeat([]byte("x"), 50<<10))
}

func BenchmarkE2E_GatewayPrompt50KB(b *testing.B) {
	up := fastUpstream(b)
	gw := benchGateway(b, up.URL, "--api-key-file", benchKeyFile(b))
	e2e(b, gw+"/api/prompt", http.Header{"X-Api-Key": {testKey2}}, bytes.Repeat([]byte("x"), 50<<10))
}

func benchKeyFile(b *testing.B) string {
	p := b.TempDir() + "/keys"
	writeFileB(b, p, testKey2+"\n")
	return p
}
