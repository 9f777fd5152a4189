package proxy

import (
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"
)

// comfyOn serves a minimal ComfyUI stand-in on ln: every request gets 200
// with its method and path, after its body is read.
func comfyOn(ln net.Listener) *http.Server {
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		fmt.Fprintf(w, "%s %s", r.Method, r.URL.Path)
	})}
	go srv.Serve(ln)
	return srv
}

// TestComfyUIRestartedWithinASecond pins that a ComfyUI that dies and is
// back within a second is not a burst of 502s. The gateway's own connection
// pool used to hand out connections to the dead process: 6 of 20 POSTs and
// 2 of 20 GETs sent after the restart got 502. Now a connection ComfyUI
// closes leaves the pool when the close arrives, so every request sent once
// the new process listens gets through, POSTs included, under load; a
// request that meets the gap itself gets the gateway's 502.
func TestComfyUIRestartedWithinASecond(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	comfy := comfyOn(ln)

	p := New(poolOf(t, "http://"+addr), Options{Logger: slog.New(slog.DiscardHandler)})
	gw := httptest.NewServer(p)
	defer gw.Close()
	defer p.Close()
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}, Timeout: 10 * time.Second}
	defer client.CloseIdleConnections()

	send := func(i int) (int, string) {
		var res *http.Response
		var err error
		if i%2 == 0 {
			res, err = client.Post(gw.URL+"/prompt", "application/json", strings.NewReader(`{"prompt":{}}`))
		} else {
			res, err = client.Get(gw.URL + "/queue")
		}
		if err != nil {
			return 0, err.Error()
		}
		defer res.Body.Close()
		b, _ := io.ReadAll(res.Body)
		return res.StatusCode, string(b)
	}
	burst := func(n int) []string {
		var (
			wg   sync.WaitGroup
			mu   sync.Mutex
			bad  []string
			gate = make(chan struct{})
		)
		for i := range n {
			wg.Go(func() {
				<-gate
				if status, body := send(i); status != 200 {
					mu.Lock()
					bad = append(bad, fmt.Sprintf("request %d: %d %s", i, status, body))
					mu.Unlock()
				}
			})
		}
		close(gate)
		wg.Wait()
		return bad
	}

	// Many pooled connections to the first process.
	if bad := burst(40); len(bad) > 0 {
		t.Fatalf("before the restart: %v", bad)
	}

	// Load that runs across the restart: each request notes when it
	// started and how it ended.
	type result struct {
		start  time.Time
		status int
		body   string
	}
	var (
		loadWG  sync.WaitGroup
		loadMu  sync.Mutex
		results []result
		stop    = make(chan struct{})
	)
	for w := range 4 {
		loadWG.Go(func() {
			for i := w; ; i += 4 {
				select {
				case <-stop:
					return
				default:
				}
				start := time.Now()
				status, body := send(i)
				loadMu.Lock()
				results = append(results, result{start, status, body})
				loadMu.Unlock()
			}
		})
	}

	time.Sleep(50 * time.Millisecond)
	comfy.Close() // the process dies: every connection closes
	time.Sleep(300 * time.Millisecond)
	ln, err = net.Listen("tcp", addr)
	if err != nil {
		t.Fatalf("restart on %s: %v", addr, err)
	}
	comfy = comfyOn(ln)
	defer comfy.Close()
	upAt := time.Now()

	// Right after the restart: 20 POSTs and 20 GETs at once.
	if bad := burst(40); len(bad) > 0 {
		t.Errorf("after the restart, %d of 40 requests failed: %v", len(bad), bad)
	}
	time.Sleep(50 * time.Millisecond)
	close(stop)
	loadWG.Wait()

	gap := 0
	for _, r := range results {
		switch {
		case r.status == 200:
		case r.start.After(upAt):
			t.Errorf("a request sent after the restart got %d %s", r.status, r.body)
		case r.status == 502 && strings.Contains(r.body, `"upstream_unavailable"`):
			gap++
		default:
			t.Errorf("a request during the restart got %d %q; want 200 or the gateway's 502", r.status, r.body)
		}
	}
	t.Logf("%d requests under load, %d met the gap and got 502", len(results), gap)
}
