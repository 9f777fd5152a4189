package health

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"time"
)

// UpstreamStatus is what the fleet knows of one ComfyUI server.
type UpstreamStatus struct {
	Name             string
	Healthy          bool
	Draining         bool
	Pending, Running int
	Version          string
	// Nodes counts the node classes the fleet read from the server's
	// /object_info (0 before the first read: it gets prompts only when
	// no other server can take them).
	Nodes int
	// SystemStats is the server's last /system_stats answer.
	SystemStats json.RawMessage
}

// UpstreamReport is one server in a fleet's /health.
type UpstreamReport struct {
	Name    string `json:"name"`
	Status  string `json:"status"`
	Queue   *Queue `json:"queue,omitempty"`
	Device  string `json:"device,omitempty"`
	VRAM    *VRAM  `json:"vram,omitempty"`
	Version string `json:"version,omitempty"`
	Nodes   int    `json:"nodes"`
}

// FleetReport is /health in fleet mode: the seed's shape for the fleet as
// a whole (healthy while one server is; the queue summed; device and VRAM
// of the first healthy server), and each server.
type FleetReport struct {
	Report
	Upstreams []UpstreamReport `json:"upstreams"`
}

// Fleet serves /health and /health/ready from the fleet's polls (it makes
// no call of its own: the fleet polls every server every few seconds).
type Fleet struct {
	status         func() []UpstreamStatus
	gatewayVersion string
	maxQueue       int
	start          time.Time
	// Replica, if set, describes this replica in /health (--redis).
	Replica func(context.Context) *Replica
}

// NewFleet returns the health endpoints of a fleet whose servers status
// reports. maxQueue is --max-queue (0: no limit).
func NewFleet(status func() []UpstreamStatus, gatewayVersion string, maxQueue int) *Fleet {
	return &Fleet{status: status, gatewayVersion: gatewayVersion, maxQueue: maxQueue, start: time.Now()}
}

// Report builds the fleet's /health document.
func (f *Fleet) Report() *FleetReport {
	rep := &FleetReport{Report: Report{Timestamp: unixSeconds(time.Now()), GatewayVersion: f.gatewayVersion}, Upstreams: []UpstreamReport{}}
	q := &Queue{}
	for _, s := range f.status() {
		ur := UpstreamReport{Name: s.Name, Status: "unhealthy"}
		if s.Healthy {
			ur.Status = "healthy"
			if s.Draining {
				ur.Status = "draining"
			}
			ur.Queue = &Queue{Pending: s.Pending, Running: s.Running}
			ur.Nodes = s.Nodes
			q.Pending += s.Pending
			q.Running += s.Running
			ur.Version = s.Version
			if ur.Version == "" {
				ur.Version = "unknown"
			}
			var stats systemStats
			if json.Unmarshal(s.SystemStats, &stats) == nil && len(stats.Devices) > 0 {
				d := stats.Devices[0]
				ur.Device = deviceName(d.Type, d.Index, d.Name)
				ur.VRAM = &VRAM{Total: d.VRAMTotal, Free: d.VRAMFree, Used: max(d.VRAMTotal-d.VRAMFree, 0)}
			}
			if rep.Status == "" {
				rep.Status, rep.Version, rep.Device, rep.VRAM = "healthy", ur.Version, ur.Device, ur.VRAM
			}
		}
		rep.Upstreams = append(rep.Upstreams, ur)
	}
	if rep.Status == "" {
		rep.Status, rep.Error = "unhealthy", "no ComfyUI server is reachable"
		return rep
	}
	rep.Queue = q
	return rep
}

// ServeHTTP answers /health: 200 while one server is healthy, else 503.
func (f *Fleet) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	rep := f.Report()
	if f.Replica != nil {
		rep.Replica = f.Replica(r.Context())
	}
	code := http.StatusOK
	if !rep.Healthy() {
		code = http.StatusServiceUnavailable
	}
	body, _ := json.Marshal(rep)
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(code)
	w.Write(append(body, '\n'))
}

// Live answers /health/live: 200 whenever the gateway runs a handler.
func (f *Fleet) Live() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		writeProbe(w, http.StatusOK, probeBody{
			Status: "alive",
			Reason: "the gateway is serving requests (ComfyUI is not checked by this probe)",
			Uptime: time.Since(f.start).Seconds(),
		})
	})
}

// Ready answers /health/ready: 200 while at least one server can take
// work and the fleet's queue is under --max-queue.
func (f *Fleet) Ready() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rep := f.Report()
		usable := 0
		for _, u := range rep.Upstreams {
			if u.Status == "healthy" {
				usable++
			}
		}
		switch {
		case usable == 0:
			writeProbe(w, http.StatusServiceUnavailable, probeBody{Status: "not_ready", Reason: "no ComfyUI server can take work"})
		case f.maxQueue > 0 && rep.Queue.Pending+rep.Queue.Running >= f.maxQueue:
			writeProbe(w, http.StatusServiceUnavailable, probeBody{Status: "not_ready", Queue: rep.Queue,
				Reason: fmt.Sprintf("the fleet's queue holds %d prompts, at or above --max-queue %d", rep.Queue.Pending+rep.Queue.Running, f.maxQueue)})
		default:
			writeProbe(w, http.StatusOK, probeBody{Status: "ready", Queue: rep.Queue,
				Reason: fmt.Sprintf("%d of %d ComfyUI servers can take work", usable, len(rep.Upstreams))})
		}
	})
}
