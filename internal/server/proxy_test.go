package server

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/coder/websocket"
	"github.com/google/go-cmp/cmp"

	"github.com/comfygate/comfygate/internal/comfytest"
	"github.com/comfygate/comfygate/internal/config"
)

func TestUpstreamDown(t *testing.T) {
	fake := comfytest.New(t, comfytest.Options{})
	g := startWith(t, fake, "--upstream", "http://"+deadAddr(t), "--api-key-file", keyFile(t, testKey2))
	resp, body := do(t, "GET", g.URL+"/api/queue", nil, "X-API-Key", testKey2)
	if resp.StatusCode != http.StatusBadGateway || !strings.Contains(resp.Header.Get("Content-Type"), "application/json") {
		t.Fatalf("status %d %q; want 502 JSON", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	var e struct{ Error, Message string }
	if err := json.Unmarshal(body, &e); err != nil || e.Error != "upstream_unavailable" {
		t.Errorf("body %s", body)
	}
	if strings.Contains(string(body), "127.0.0.1") {
		t.Errorf("502 body leaks the upstream address: %s", body)
	}
}

// noHealthSharing makes every /health call check ComfyUI afresh, so that
// tests need not wait for a shared result to expire.
func noHealthSharing(c *config.Config) { c.HealthTTL = time.Nanosecond }

// TestHealth covers the seed's /health shape and the unhealthy cases.
func TestHealth(t *testing.T) {
	g := startTuned(t, comfytest.Options{Version: "0.8.0"}, noHealthSharing,
		"--api-key-file", keyFile(t, testKey2), "--health-timeout", "300ms")
	resp, body := do(t, "GET", g.URL+"/health", nil)
	if resp.StatusCode != 200 {
		t.Fatalf("status %d: %s", resp.StatusCode, body)
	}
	var got map[string]any
	if err := json.Unmarshal(body, &got); err != nil {
		t.Fatal(err)
	}
	// Values from the fake's system_stats sample (CPU device, RAM as VRAM).
	_, sb := do(t, "GET", g.Fake.URL()+"/system_stats", nil)
	var raw struct {
		Devices []map[string]float64
	}
	json.Unmarshal(sb, &raw)
	total, free := raw.Devices[0]["vram_total"], raw.Devices[0]["vram_free"]
	ts, _ := got["timestamp"].(float64)
	if now := float64(time.Now().Unix()); ts < now-5 || ts > now+1 {
		t.Errorf("timestamp %v is not now (%v)", ts, now)
	}
	delete(got, "timestamp")
	want := map[string]any{
		"status":          "healthy",
		"version":         "0.8.0",
		"queue":           map[string]any{"pending": 0.0, "running": 0.0},
		"device":          "cpu",
		"vram":            map[string]any{"total": total, "free": free, "used": total - free},
		"gateway_version": "test",
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("/health (-want +got):\n%s", diff)
	}

	// A busy server.
	g.Fake.SetQueue(1, 3)
	_, body = do(t, "GET", g.URL+"/health", nil)
	if !strings.Contains(string(body), `"queue":{"pending":3,"running":1}`) {
		t.Errorf("busy: %s", body)
	}
	g.Fake.SetQueue(0, 0)

	unhealthy := []struct {
		name    string
		setup   func()
		wantErr string
	}{
		{"slow", func() { g.Fake.SetDelay("/system_stats", 2*time.Second) }, "did not answer within 300ms"},
		{"garbage", func() { g.Fake.SetResponse("/system_stats", 200, "application/json", []byte("<html>")) }, "is not valid JSON"},
		{"wrong shape", func() { g.Fake.SetResponse("/queue", 200, "application/json", []byte(`{"foo":1}`)) }, "not a queue"},
		{"not system stats", func() { g.Fake.SetResponse("/system_stats", 200, "application/json", []byte(`[1,2]`)) }, "not valid JSON"},
		{"error status", func() { g.Fake.SetResponse("/queue", 500, "text/plain", []byte("boom")) }, "status 500"},
	}
	for _, tt := range unhealthy {
		t.Run(tt.name, func(t *testing.T) {
			g.Fake.ClearOverrides()
			tt.setup()
			resp, body := do(t, "GET", g.URL+"/health", nil)
			if resp.StatusCode != http.StatusServiceUnavailable {
				t.Fatalf("status %d; want 503: %s", resp.StatusCode, body)
			}
			var r map[string]any
			json.Unmarshal(body, &r)
			if r["status"] != "unhealthy" || !strings.Contains(str(r["error"]), tt.wantErr) || r["timestamp"] == nil {
				t.Errorf("body %s; want unhealthy with error containing %q", body, tt.wantErr)
			}
		})
	}
	g.Fake.ClearOverrides()
}

func TestHealthDown(t *testing.T) {
	fake := comfytest.New(t, comfytest.Options{})
	g := startWith(t, fake, "--upstream", "http://"+deadAddr(t))
	resp, body := do(t, "GET", g.URL+"/health", nil)
	if resp.StatusCode != http.StatusServiceUnavailable || !strings.Contains(string(body), `"error":"ComfyUI is not reachable"`) {
		t.Errorf("status %d body %s", resp.StatusCode, body)
	}
}

// TestHealthSharedUnderLoad: concurrent and back-to-back calls make one
// check of ComfyUI. It runs the chain in process inside a synctest bubble,
// with the fake ComfyUI in process too: there is no start-up check whose
// shared result must expire first, and the count is exact.
func TestHealthSharedUnderLoad(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		fake := comfytest.NewFake(comfytest.Options{})
		fake.SetDelay("/system_stats", 100*time.Millisecond)
		srv, err := newServer(loadConfig(t), discardLogger(), "test", nil, inProcess(fake))
		if err != nil {
			t.Fatal(err)
		}
		srv.health.SetClient(&http.Client{Transport: inProcess(fake)})
		h := srv.Handler()
		get := func() {
			w := httptest.NewRecorder()
			h.ServeHTTP(w, httptest.NewRequest("GET", "http://gw/health", nil))
			if w.Code != 200 {
				t.Errorf("status %d: %s", w.Code, w.Body)
			}
		}
		var wg sync.WaitGroup
		for range 100 {
			wg.Go(get)
		}
		wg.Wait()
		for range 20 {
			get()
		}
		counts := map[string]int{}
		for _, r := range fake.Requests() {
			counts[r.Path]++
		}
		if counts["/system_stats"] != 1 || counts["/queue"] != 1 {
			t.Errorf("ComfyUI saw %v for 120 /health calls; want one of each", counts)
		}
	})
}

// patternReader is a large ReadSeeker that holds nothing in memory. Reads
// past block stall until release is closed.
type patternReader struct {
	size, off, block int64
	release          chan struct{}
}

func (p *patternReader) Read(b []byte) (int, error) {
	if p.off >= p.size {
		return 0, io.EOF
	}
	if p.block > 0 && p.off >= p.block {
		<-p.release
	}
	n := int64(len(b))
	if n > p.size-p.off {
		n = p.size - p.off
	}
	for i := range b[:n] {
		b[i] = byte((p.off + int64(i)) % 251)
	}
	p.off += n
	return int(n), nil
}

func (p *patternReader) Seek(off int64, whence int) (int64, error) {
	switch whence {
	case io.SeekStart:
		p.off = off
	case io.SeekCurrent:
		p.off += off
	case io.SeekEnd:
		p.off = p.size + off
	}
	return p.off, nil
}

// TestViewStreams proves a large download streams: the client gets the start
// of the file while ComfyUI has not produced the rest (if the gateway buffered
// the body, the client would get nothing and the test would time out).
func TestViewStreams(t *testing.T) {
	g := start(t, comfytest.Options{}, "--api-key-file", keyFile(t, testKey2))
	release := make(chan struct{})
	var once sync.Once
	unblock := func() { once.Do(func() { close(release) }) }
	defer unblock() // never leave the fake blocked, even on failure
	g.Fake.AddFile("output", "", "big.mp4", &patternReader{size: 2 << 30, block: 1 << 20, release: release}, time.Now())
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "GET", g.URL+"/api/view?filename=big.mp4&type=output&api_key="+testKey2, nil)
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.ContentLength != 2<<30 {
		t.Errorf("Content-Length %d; want 2 GiB", resp.ContentLength)
	}
	// ComfyUI stops after 1 MiB. Each server on the way may hold back a
	// few KiB in its write buffer until more comes, so read half of it.
	first := make([]byte, 512<<10)
	if _, err := io.ReadFull(resp.Body, first); err != nil {
		t.Fatalf("the first 512 KiB did not arrive while the rest was held back: %v", err)
	}
	if first[1000] != byte(1000%251) {
		t.Error("wrong bytes")
	}
	unblock()
	cancel() // no need to pull 2 GiB through; the point is proven
}

func TestViewRange(t *testing.T) {
	g := start(t, comfytest.Options{}, "--api-key-file", keyFile(t, testKey2))
	g.Fake.AddFile("output", "clips", "v.mp4", &patternReader{size: 10 << 20}, time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC))
	target := g.URL + "/view?filename=v.mp4&subfolder=clips&type=output"
	resp, body := do(t, "GET", target, nil, "X-API-Key", testKey2, "Range", "bytes=5000000-5000009")
	if resp.StatusCode != http.StatusPartialContent || resp.Header.Get("Content-Range") != "bytes 5000000-5000009/10485760" {
		t.Fatalf("status %d, Content-Range %q", resp.StatusCode, resp.Header.Get("Content-Range"))
	}
	for i, b := range body {
		if b != byte((5000000+i)%251) {
			t.Fatalf("byte %d wrong", i)
		}
	}
	lm := resp.Header.Get("Last-Modified")
	resp, _ = do(t, "GET", target, nil, "X-API-Key", testKey2, "If-Modified-Since", lm)
	if resp.StatusCode != http.StatusNotModified {
		t.Errorf("conditional GET: %d; want 304", resp.StatusCode)
	}
}

// TestUploadStreams proves a large upload streams: ComfyUI sees the first
// bytes while the client is still holding the rest back.
func TestUploadStreams(t *testing.T) {
	got := make(chan int, 1)
	upstream := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/upload/image" {
			http.NotFound(w, r) // the gateway's background checks
			return
		}
		buf := make([]byte, 1<<20)
		n, _ := io.ReadFull(r.Body, buf)
		got <- n
		rest, _ := io.Copy(io.Discard, r.Body)
		fmt.Fprintf(w, `{"name":"x.png","subfolder":"","type":"input","size":%d}`, int64(n)+rest)
	}))
	defer upstream.Close()
	fake := comfytest.New(t, comfytest.Options{})
	g := startWith(t, fake, "--upstream", upstream.URL, "--api-key-file", keyFile(t, testKey2), "--max-upload-size", "200")

	pr, pw := io.Pipe()
	done := make(chan struct{})
	var resp *http.Response
	var err error
	go func() {
		defer close(done)
		req, _ := http.NewRequest("POST", g.URL+"/upload/image", pr)
		req.ContentLength = 100 << 20
		req.Header.Set("X-API-Key", testKey2)
		resp, err = client.Do(req)
	}()
	chunk := bytes.Repeat([]byte("u"), 1<<20)
	pw.Write(chunk)
	select {
	case n := <-got:
		if n != 1<<20 {
			t.Fatalf("ComfyUI got %d bytes", n)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("ComfyUI saw nothing while the client held back 99 MB: the body is buffered")
	}
	for range 99 {
		pw.Write(chunk)
	}
	pw.Close()
	<-done
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.Contains(string(b), fmt.Sprintf(`"size":%d`, 100<<20)) {
		t.Errorf("upstream reply %s", b)
	}
}

func TestMaxUploadSize(t *testing.T) {
	g := start(t, comfytest.Options{}, "--api-key-file", keyFile(t, testKey2), "--max-upload-size", "1")
	for _, chunked := range []bool{false, true} {
		g.Fake.Reset()
		resp, body := uploadRaw(t, g.Addr, 2<<20, chunked)
		if resp.StatusCode != http.StatusRequestEntityTooLarge || !strings.Contains(string(body), "request_too_large") {
			t.Errorf("chunked=%v: status %d %s; want 413 JSON", chunked, resp.StatusCode, body)
		}
		for _, r := range g.Fake.Requests() {
			if !chunked {
				t.Errorf("an over-size body with Content-Length reached ComfyUI: %s %s", r.Method, r.Path)
			}
			if r.BodySize > 1<<20 {
				t.Errorf("ComfyUI read %d bytes of an over-size body", r.BodySize)
			}
		}
	}
	// Exactly at the limit passes.
	resp, _ := do(t, "POST", g.URL+"/prompt", bytes.NewReader(bytes.Repeat([]byte(" "), 1<<20)), "X-API-Key", testKey2)
	if resp.StatusCode == http.StatusRequestEntityTooLarge {
		t.Error("a body of exactly the limit got 413")
	}
}

// uploadRaw posts size bytes to /upload/image over a raw connection and
// reads the answer. The gateway answers 413 and closes while the client is
// still sending; Go's client would report the failed write, not the answer,
// while curl and browsers show the answer.
func uploadRaw(t *testing.T, addr string, size int, chunked bool) (*http.Response, []byte) {
	t.Helper()
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	go func() {
		framing := fmt.Sprintf("Content-Length: %d", size)
		if chunked {
			framing = "Transfer-Encoding: chunked"
		}
		fmt.Fprintf(conn, "POST /upload/image HTTP/1.1\r\nHost: %s\r\nX-API-Key: %s\r\n%s\r\n\r\n", addr, testKey2, framing)
		chunk := bytes.Repeat([]byte("a"), 64<<10)
		for sent := 0; sent < size; sent += len(chunk) {
			var err error
			if chunked {
				_, err = fmt.Fprintf(conn, "%x\r\n%s\r\n", len(chunk), chunk)
			} else {
				_, err = conn.Write(chunk)
			}
			if err != nil {
				return
			}
		}
		if chunked {
			io.WriteString(conn, "0\r\n\r\n")
		}
	}()
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, b
}

// TestOriginCheckThroughGateway: ComfyUI's own Host/Origin check keeps
// passing same-origin browser use through the gateway and keeps refusing
// foreign pages.
func TestOriginCheckThroughGateway(t *testing.T) {
	g := start(t, comfytest.Options{})
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	tests := []struct {
		name, host, origin string
		want               int
	}{
		{"no origin (scripts)", "", "", 200},
		{"same origin", "", "http://" + g.Addr, 200},
		{"foreign page against a loopback host", "", "https://evil.example", 403},
		{"localhost vs 127.0.0.1, as ComfyUI", "", "http://localhost:" + strings.Split(g.Addr, ":")[1], 403},
		{"public name kept", "comfy.example.com", "https://comfy.example.com", 200},
		{"null origin", "", "null", 200},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := []string{}
			if tt.host != "" {
				h = append(h, "Host", tt.host)
			}
			if tt.origin != "" {
				h = append(h, "Origin", tt.origin)
			}
			resp, _ := do(t, "GET", g.URL+"/api/system_stats", nil, h...)
			if resp.StatusCode != tt.want {
				t.Errorf("GET: %d; want %d", resp.StatusCode, tt.want)
			}
			resp, _ = do(t, "POST", g.URL+"/api/prompt", strings.NewReader(`{"prompt":{}}`), h...)
			if wantPost := map[int]int{200: 400, 403: 403}[tt.want]; resp.StatusCode != wantPost {
				t.Errorf("POST: %d; want %d", resp.StatusCode, wantPost)
			}
			hdr := http.Header{}
			if tt.origin != "" {
				hdr.Set("Origin", tt.origin)
			}
			if tt.host != "" {
				hdr.Set("Host", tt.host)
			}
			c, resp, err := dialWS(ctx, g, "/ws?clientId=o", hdr, nil)
			if tt.want == 200 {
				if err != nil {
					t.Errorf("WS: %v", err)
				} else {
					c.Close(websocket.StatusNormalClosure, "")
				}
			} else if resp == nil || resp.StatusCode != 403 {
				t.Errorf("WS: %v; want 403", err)
			}
		})
	}
}

// TestServeTLS runs HTTPS and WSS with a generated certificate.
func TestServeTLS(t *testing.T) {
	certPEM, keyPEM := selfSigned(t)
	dir := t.TempDir()
	certFile, keyFileP := filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	os.WriteFile(certFile, certPEM, 0o600)
	os.WriteFile(keyFileP, keyPEM, 0o600)
	g := start(t, comfytest.Options{}, "--tls-certfile", certFile, "--tls-keyfile", keyFileP, "--api-key-file", keyFile(t, testKey2), "--protect-ws")
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(certPEM)
	tlsConf := &tls.Config{RootCAs: pool}
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: tlsConf}}

	req, _ := http.NewRequest("GET", g.URL+"/api/queue", nil)
	req.Header.Set("X-API-Key", testKey2)
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 || resp.TLS == nil || resp.Proto != "HTTP/1.1" {
		t.Errorf("HTTPS: %d %s tls=%v", resp.StatusCode, resp.Proto, resp.TLS != nil)
	}
	if r, _ := g.Fake.LastRequest(); r.Header.Get("X-Forwarded-Proto") != "https" {
		t.Errorf("X-Forwarded-Proto = %q; want https", r.Header.Get("X-Forwarded-Proto"))
	}
	// Plain HTTP on the TLS port is refused.
	if r, err := client.Get("http://" + g.Addr + "/health"); err == nil {
		r.Body.Close()
		if r.StatusCode == 200 {
			t.Error("plain HTTP served on the TLS port")
		}
	}
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	c, _, err := dialWS(ctx, g, "/ws?clientId=tls&api_key="+testKey2, nil, tlsConf)
	if err != nil {
		t.Fatalf("WSS: %v", err)
	}
	exchange(t, ctx, g, c, "tls")
	c.Close(websocket.StatusNormalClosure, "")
}

// TestShutdownFinishesInFlight: a request in flight when SIGTERM arrives
// still gets its answer.
func TestShutdownFinishesInFlight(t *testing.T) {
	g := start(t, comfytest.Options{}, "--shutdown-timeout", "5s")
	g.Fake.SetDelay("/object_info", 500*time.Millisecond)
	result := make(chan int, 1)
	go func() {
		resp, err := client.Get(g.URL + "/api/object_info")
		if err != nil {
			result <- -1
			return
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		result <- resp.StatusCode
	}()
	time.Sleep(150 * time.Millisecond)
	if err := g.stop(t); err != nil {
		t.Errorf("Serve: %v", err)
	}
	if code := <-result; code != 200 {
		t.Errorf("in-flight request got %d; want 200", code)
	}
	if _, err := client.Get(g.URL + "/health"); err == nil {
		t.Error("the gateway still accepts requests after shutdown")
	}
}

func TestListenPortTaken(t *testing.T) {
	fake := comfytest.New(t, comfytest.Options{})
	g := startWith(t, fake, "--upstream", fake.URL())
	port := strings.Split(g.Addr, ":")[1]
	cfg := loadConfig(t, "--port", port)
	srv, err := New(cfg, discardLogger(), "test", io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	_, err = srv.Listen()
	if err == nil || !strings.Contains(err.Error(), "already in use") || !strings.Contains(err.Error(), "--port") {
		t.Errorf("Listen on a taken port: %v", err)
	}
}
