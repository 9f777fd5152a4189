package server

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"go.uber.org/goleak"

	"github.com/comfygate/comfygate/internal/comfytest"
	"github.com/comfygate/comfygate/internal/config"
	"github.com/comfygate/comfygate/internal/testcert"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// Test keys. The second one only ever appears in a key file.
const (
	testKey  = "k3y-0123456789abcdef0123456789ab"
	testKey2 = "k3y-fedcba9876543210fedcba987654"
)

// gateway is comfygate serving on a real loopback listener in front of a
// fake ComfyUI, with its log captured.
type gateway struct {
	URL  string // http://127.0.0.1:port
	Addr string // 127.0.0.1:port
	// MetricsURL is the --metrics-listen address, if set.
	MetricsURL string
	Fake       *comfytest.Fake
	Server     *Server
	logs       *syncBuffer
	cancel     context.CancelFunc
	done       chan error
}

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

// start runs comfygate with args (its --upstream defaults to a new fake
// ComfyUI) and stops it at the end of the test.
func start(t *testing.T, fakeOpts comfytest.Options, args ...string) *gateway {
	t.Helper()
	return startTuned(t, fakeOpts, nil, args...)
}

// startTuned is start with tune applied to the loaded configuration, for
// the durations that are not flags (config.Config.HealthTTL and
// KeyPollInterval): tests shorten them rather than wait them out.
func startTuned(t *testing.T, fakeOpts comfytest.Options, tune func(*config.Config), args ...string) *gateway {
	t.Helper()
	fake := comfytest.New(t, fakeOpts)
	return serve(t, fake, tune, append([]string{"--upstream", fake.URL()}, args...))
}

func startWith(t *testing.T, fake *comfytest.Fake, args ...string) *gateway {
	t.Helper()
	return serve(t, fake, nil, args)
}

func serve(t *testing.T, fake *comfytest.Fake, tune func(*config.Config), args []string) *gateway {
	t.Helper()
	// The background check of ComfyUI runs once at start and then, unless a
	// test asks otherwise, not again: tests count what the fake received.
	args = append([]string{"--metrics-interval", "1h"}, args...)
	cfg, err := config.Load(args, func(string) (string, bool) { return "", false })
	if err != nil {
		t.Fatalf("config: %v", err)
	}
	if tune != nil {
		tune(cfg)
	}
	logs := &syncBuffer{}
	logger := slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	srv, err := New(cfg, logger, "test", logs)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	g := &gateway{
		Addr: ln.Addr().String(), Fake: fake, Server: srv, logs: logs,
		cancel: cancel, done: make(chan error, 1),
	}
	scheme := "http"
	if cfg.TLS() {
		scheme = "https"
	}
	g.URL = scheme + "://" + g.Addr
	mln, err := srv.ListenMetrics()
	if err != nil {
		t.Fatal(err)
	}
	if mln != nil {
		g.MetricsURL = "http://" + mln.Addr().String()
	}
	go func() { g.done <- srv.Serve(ctx, []net.Listener{ln}, mln) }()
	t.Cleanup(func() { g.stop(t) })
	g.waitFirstCheck(t)
	return g
}

// waitFirstCheck waits for the start-up check of ComfyUI, then forgets what
// the fake received from it.
func (g *gateway) waitFirstCheck(t *testing.T) {
	t.Helper()
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	defer hc.CloseIdleConnections()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		resp, err := hc.Get(g.URL + "/health/ready")
		if err != nil {
			continue
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if !strings.Contains(string(b), "has not been checked yet") {
			g.Fake.Reset()
			return
		}
	}
	t.Fatal("the gateway never checked ComfyUI")
}

// stop shuts the gateway down and waits for Serve to return.
func (g *gateway) stop(t *testing.T) error {
	t.Helper()
	g.cancel()
	select {
	case err, ok := <-g.done:
		if ok {
			close(g.done)
		}
		return err
	case <-time.After(20 * time.Second):
		t.Fatal("gateway did not shut down")
		return nil
	}
}

var client = &http.Client{
	Transport: &http.Transport{MaxIdleConnsPerHost: 16, DisableCompression: true},
	CheckRedirect: func(*http.Request, []*http.Request) error {
		return http.ErrUseLastResponse
	},
}

// do sends a request and returns the response with its body read.
func do(t *testing.T, method, url string, body io.Reader, header ...string) (*http.Response, []byte) {
	t.Helper()
	req, err := http.NewRequestWithContext(t.Context(), method, url, body)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i+1 < len(header); i += 2 {
		if strings.EqualFold(header[i], "Host") {
			req.Host = header[i+1]
			continue
		}
		req.Header.Add(header[i], header[i+1])
	}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: reading body: %v", method, url, err)
	}
	return resp, b
}

// rawRequest writes request-target exactly as given, so that paths Go's
// client would clean or escape reach the gateway unchanged. It returns the
// status code.
func rawRequest(t *testing.T, addr, method, target string, header ...string) int {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	var b strings.Builder
	b.WriteString(method + " " + target + " HTTP/1.1\r\nHost: " + addr + "\r\nConnection: close\r\n")
	for i := 0; i+1 < len(header); i += 2 {
		b.WriteString(header[i] + ": " + header[i+1] + "\r\n")
	}
	b.WriteString("\r\n")
	if _, err := io.WriteString(conn, b.String()); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatalf("%s %s: %v", method, target, err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

// deadAddr returns a loopback address that refuses connections.
func deadAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// credentialsSeen lists every key-carrying header or parameter in what the
// fake ComfyUI received.
func credentialsSeen(fake *comfytest.Fake) []string {
	var seen []string
	for _, r := range fake.Requests() {
		for _, h := range []string{"Authorization", "X-Api-Key"} {
			if v := r.Header.Get(h); v != "" {
				seen = append(seen, r.Method+" "+r.Path+": "+h)
			}
		}
		for _, p := range strings.Split(r.RawQuery, "&") {
			if strings.HasPrefix(p, "api_key=") || strings.HasPrefix(p, "token=") {
				seen = append(seen, r.Method+" "+r.Path+": ?"+p)
			}
		}
		for _, k := range []string{testKey, testKey2} {
			if strings.Contains(r.RequestURI, k) || strings.Contains(string(r.Body), k) || headerHas(r.Header, k) {
				seen = append(seen, r.Method+" "+r.Path+": key text")
			}
		}
	}
	return seen
}

func headerHas(h http.Header, s string) bool {
	for _, vs := range h {
		for _, v := range vs {
			if strings.Contains(v, s) {
				return true
			}
		}
	}
	return false
}

// keyFile writes content to a private key file and returns its path.
func keyFile(t *testing.T, content string) string {
	t.Helper()
	p := t.TempDir() + "/keys"
	if err := os.WriteFile(p, []byte(content+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func loadConfig(t *testing.T, args ...string) *config.Config {
	t.Helper()
	cfg, err := config.Load(args, func(string) (string, bool) { return "", false })
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

func discardLogger() *slog.Logger { return slog.New(slog.DiscardHandler) }

// selfSigned returns a PEM certificate and key valid for 127.0.0.1.
func selfSigned(t *testing.T) (certPEM, keyPEM []byte) { return testcert.SelfSigned(t) }

func benchConfig(b *testing.B, args ...string) *config.Config {
	b.Helper()
	cfg, err := config.Load(args, func(string) (string, bool) { return "", false })
	if err != nil {
		b.Fatal(err)
	}
	return cfg
}

func writeFileB(b *testing.B, p, content string) {
	b.Helper()
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		b.Fatal(err)
	}
}

func mustCounter(t *testing.T, reg *prometheus.Registry, name string, labels ...string) prometheus.Collector {
	t.Helper()
	want := map[string]string{}
	for i := 0; i+1 < len(labels); i += 2 {
		want[labels[i]] = labels[i+1]
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			got := map[string]string{}
			for _, lp := range m.GetLabel() {
				got[lp.GetName()] = lp.GetValue()
			}
			if maps.Equal(got, want) {
				v := m.GetCounter().GetValue()
				return prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "x", Help: "x"}, func() float64 { return v })
			}
		}
	}
	return prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "x", Help: "x"}, func() float64 { return 0 })
}

func gaugeValue(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name && len(mf.GetMetric()) == 1 {
			return mf.GetMetric()[0].GetGauge().GetValue()
		}
	}
	t.Fatalf("no gauge %s", name)
	return 0
}

func mustGather(t *testing.T, g *gateway) []*dto.MetricFamily {
	t.Helper()
	mfs, err := g.Server.Metrics().Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	return mfs
}
