package health

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"sync/atomic"
	"time"
)

// Monitor checks ComfyUI in the background, every interval, and answers the
// probes from its latest result, so that probes and metrics scrapes, however
// frequent, never turn into calls to ComfyUI.
type Monitor struct {
	checker  *Checker
	interval time.Duration
	maxQueue int
	start    time.Time
	onUpdate func(*Report)

	latest atomic.Pointer[snapshot]
}

type snapshot struct {
	report *Report
	at     time.Time
}

// NewMonitor returns a Monitor that checks through c every interval.
// maxQueue > 0 makes readiness fail while ComfyUI's queue (pending plus
// running) is at or above it. onUpdate, if set, gets every new report.
func NewMonitor(c *Checker, interval time.Duration, maxQueue int, onUpdate func(*Report)) *Monitor {
	return &Monitor{checker: c, interval: interval, maxQueue: maxQueue, start: time.Now(), onUpdate: onUpdate}
}

// Run checks at once and then every interval until ctx is done.
func (m *Monitor) Run(ctx context.Context) {
	t := time.NewTicker(m.interval)
	defer t.Stop()
	for {
		rep := m.checker.Check(ctx)
		m.latest.Store(&snapshot{report: rep, at: time.Now()})
		if m.onUpdate != nil {
			m.onUpdate(rep)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// probeBody is what /health/live and /health/ready answer.
type probeBody struct {
	Status string  `json:"status"`
	Reason string  `json:"reason"`
	Queue  *Queue  `json:"queue,omitempty"`
	Uptime float64 `json:"uptime_seconds,omitempty"`
	// CheckedAt is when ComfyUI was last checked (Unix seconds).
	CheckedAt float64 `json:"checked_at,omitempty"`
}

func writeProbe(w http.ResponseWriter, code int, b probeBody) {
	body, _ := json.Marshal(b)
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(code)
	w.Write(append(body, '\n'))
}

// Live answers /health/live: 200 whenever the gateway can run a handler. It
// never calls ComfyUI, so a restart is never triggered by ComfyUI being
// down or busy.
func (m *Monitor) Live() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		writeProbe(w, http.StatusOK, probeBody{
			Status: "alive",
			Reason: "the gateway is serving requests (ComfyUI is not checked by this probe)",
			Uptime: time.Since(m.start).Seconds(),
		})
	})
}

// Ready answers /health/ready from the latest background check: 503 while
// ComfyUI is down, while its queue is at or above the limit, or when no
// recent check exists; 200 otherwise.
func (m *Monitor) Ready() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		code, body := m.readiness()
		writeProbe(w, code, body)
	})
}

func (m *Monitor) readiness() (int, probeBody) {
	s := m.latest.Load()
	if s == nil {
		return http.StatusServiceUnavailable, probeBody{Status: "not_ready", Reason: "ComfyUI has not been checked yet"}
	}
	checked := unixSeconds(s.at)
	// A check is overdue when the monitor has stalled; do not trust it.
	if age := time.Since(s.at); age > 3*m.interval+m.checker.opts.Timeout {
		return http.StatusServiceUnavailable, probeBody{Status: "not_ready", CheckedAt: checked,
			Reason: fmt.Sprintf("the last check of ComfyUI is %s old", age.Round(time.Second))}
	}
	rep := s.report
	if !rep.Healthy() {
		return http.StatusServiceUnavailable, probeBody{Status: "not_ready", Reason: rep.Error, CheckedAt: checked}
	}
	if n := rep.Queue.Pending + rep.Queue.Running; m.maxQueue > 0 && n >= m.maxQueue {
		return http.StatusServiceUnavailable, probeBody{Status: "not_ready", Queue: rep.Queue, CheckedAt: checked,
			Reason: fmt.Sprintf("ComfyUI's queue holds %d prompts, at or above --max-queue %d", n, m.maxQueue)}
	}
	reason := "ComfyUI is up"
	if m.maxQueue > 0 {
		reason = fmt.Sprintf("ComfyUI is up and its queue is below --max-queue %d", m.maxQueue)
	}
	return http.StatusOK, probeBody{Status: "ready", Reason: reason, Queue: rep.Queue, CheckedAt: checked}
}
