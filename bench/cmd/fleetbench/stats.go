package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"sync"
	"time"
)

// SimStats is GET /sim/stats of comfyui-sim (comfytest.Stats).
type SimStats struct {
	ModelLoads  int       `json:"model_loads"`
	LoadedModel string    `json:"loaded_model"`
	BusySeconds float64   `json:"busy_seconds"`
	Completed   []string  `json:"completed"`
	Running     string    `json:"running"`
	Pending     []string  `json:"pending"`
	Runs        []SimRun  `json:"runs"`
	At          time.Time `json:"-"` // when it was read
}

// SimRun is one prompt a simulated server ran.
type SimRun struct {
	PromptID   string `json:"prompt_id"`
	Start      int64  `json:"start_ns"`
	End        int64  `json:"end_ns"`
	Completed  bool   `json:"completed"`
	ModelLoads int    `json:"model_loads"`
}

// watcher reads every server's /sim/stats every interval, and keeps the
// last snapshot of each (the last one of a server that was killed is what
// it did) and when each prompt id was first seen queued or running on
// each server (how fast a failover queued it again).
type watcher struct {
	servers []string // base URLs
	cl      *http.Client

	mu    sync.Mutex
	last  []SimStats
	seen  []map[string]time.Time // per server: prompt id -> first seen queued or running
	alive []bool
}

func newWatcher(servers []string) *watcher {
	w := &watcher{
		servers: servers,
		cl:      &http.Client{Transport: &http.Transport{Proxy: nil}, Timeout: 2 * time.Second},
		last:    make([]SimStats, len(servers)),
		seen:    make([]map[string]time.Time, len(servers)),
		alive:   make([]bool, len(servers)),
	}
	for i := range w.seen {
		w.seen[i] = map[string]time.Time{}
		w.alive[i] = true
	}
	return w
}

func (w *watcher) read(ctx context.Context, i int) (SimStats, error) {
	var s SimStats
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, w.servers[i]+"/sim/stats", nil)
	if err != nil {
		return s, err
	}
	res, err := w.cl.Do(req)
	if err != nil {
		return s, err
	}
	defer res.Body.Close()
	b, err := io.ReadAll(io.LimitReader(res.Body, 64<<20))
	if err != nil {
		return s, err
	}
	if res.StatusCode != http.StatusOK {
		return s, fmt.Errorf("/sim/stats: status %d", res.StatusCode)
	}
	if err := json.Unmarshal(b, &s); err != nil {
		return s, err
	}
	s.At = time.Now()
	return s, nil
}

// refresh reads server i once and records what it saw.
func (w *watcher) refresh(ctx context.Context, i int) error {
	w.mu.Lock()
	alive := w.alive[i]
	w.mu.Unlock()
	if !alive {
		return nil
	}
	s, err := w.read(ctx, i)
	if err != nil {
		return err
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.alive[i] {
		return nil // killed while it was read: keep the snapshot taken before
	}
	w.last[i] = s
	for _, id := range append([]string{s.Running}, s.Pending...) {
		if _, ok := w.seen[i][id]; !ok && id != "" {
			w.seen[i][id] = s.At
		}
	}
	for _, r := range s.Runs {
		if _, ok := w.seen[i][r.PromptID]; !ok {
			w.seen[i][r.PromptID] = time.Unix(0, r.Start)
		}
	}
	return nil
}

func (w *watcher) refreshAll(ctx context.Context) {
	var wg sync.WaitGroup
	for i := range w.servers {
		wg.Go(func() { w.refresh(ctx, i) })
	}
	wg.Wait()
}

// run refreshes every interval until ctx ends.
func (w *watcher) run(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			w.refreshAll(ctx)
		}
	}
}

// dead marks server i killed: its last snapshot is final.
func (w *watcher) dead(i int) {
	w.mu.Lock()
	w.alive[i] = false
	w.mu.Unlock()
}

func (w *watcher) snapshot() ([]SimStats, []map[string]time.Time) {
	w.mu.Lock()
	defer w.mu.Unlock()
	last := append([]SimStats(nil), w.last...)
	seen := make([]map[string]time.Time, len(w.seen))
	for i, m := range w.seen {
		seen[i] = make(map[string]time.Time, len(m))
		for k, v := range m {
			seen[i][k] = v
		}
	}
	return last, seen
}
