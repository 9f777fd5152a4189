package server

import (
	"context"
	"os"
	"time"

	"github.com/comfygate/comfygate/internal/config"
	"github.com/comfygate/comfygate/internal/fleet"
	"github.com/comfygate/comfygate/internal/health"
	"github.com/comfygate/comfygate/internal/upstream"
)

// fleetRouter is the fleet as the socket hub's router (the hub is made
// first: the fleet queues prompts under the hub's client id).
type fleetRouter struct{ s *Server }

func (r fleetRouter) Route(server string, msg map[string]any) (string, string) {
	return r.s.fleet.Route(server, msg)
}

func (r fleetRouter) Missed(server string, since time.Time) []map[string]any {
	return r.s.fleet.Missed(server, since)
}

// fleetStatus is the fleet's view of its servers, for /health.
func (s *Server) fleetStatus() []health.UpstreamStatus {
	st := s.fleet.Status()
	out := make([]health.UpstreamStatus, len(st))
	for i, u := range st {
		out[i] = health.UpstreamStatus{Name: u.Name, Healthy: u.Healthy, Draining: u.Draining,
			Pending: u.Pending, Running: u.Running, Version: u.Version, Nodes: u.Nodes, SystemStats: u.SystemStats}
	}
	return out
}

// fleetPolled feeds each fleet tick to the metrics.
func (s *Server) fleetPolled(st []fleet.ServerStatus) {
	seen := make(map[string]bool, len(st))
	for _, u := range st {
		seen[u.Name] = true
		s.metrics.FleetServer(u.Name, u.Healthy, u.Pending, u.Running)
	}
	for name := range s.fleetNames {
		if !seen[name] {
			s.metrics.FleetServerGone(name)
		}
	}
	s.fleetNames = seen
}

// watchUpstreams re-reads --upstreams-file when it changes: new servers
// join the fleet; servers marked drain, or no longer listed, take no new
// prompts and leave when their queue is empty. A file with a problem
// changes nothing (and says why in the log).
func (s *Server) watchUpstreams(ctx context.Context, every time.Duration) {
	path := s.cfg.UpstreamsFile
	// The first look applies the file whatever it holds: it may have
	// changed since the configuration was read (applying the same list
	// changes nothing).
	var last os.FileInfo
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		fi, err := os.Stat(path)
		if err != nil || (last != nil && fi.ModTime().Equal(last.ModTime()) && fi.Size() == last.Size()) {
			continue
		}
		last = fi
		s.applyUpstreams(path)
	}
}

// applyUpstreams makes the pool what the upstreams file says.
func (s *Server) applyUpstreams(path string) {
	specs, problems, err := config.ReadUpstreamsFile(path)
	if err == nil && len(problems) == 0 && len(specs) == 0 {
		problems = []string{"the file lists no server"}
	}
	if err != nil || len(problems) > 0 {
		s.log.Error("upstreams file not applied; the fleet is unchanged", "file", path, "err", err, "problems", problems)
		return
	}
	listed := map[string]bool{}
	added, draining := 0, 0
	for _, spec := range specs {
		listed[spec.Name] = true
		_, known := s.pool.Get(spec.Name)
		u, err := s.pool.Add(upstream.Spec{Name: spec.Name, URL: spec.URL})
		if err != nil {
			s.log.Error("upstreams file: server not changed", "upstream", spec.Name, "err", err)
			continue
		}
		if !known {
			added++
			s.log.Info("ComfyUI server joined the fleet", "upstream", spec.Name, "url", spec.URL.Redacted())
		}
		u.SetDraining(spec.Drain)
		if spec.Drain {
			draining++
		}
	}
	for _, u := range s.pool.All() {
		if !listed[u.Name] && !u.Draining() {
			u.SetDraining(true)
			draining++
			s.log.Info("ComfyUI server removed from the upstreams file: draining; it leaves when its queue is empty", "upstream", u.Name)
		}
	}
	s.log.Info("upstreams file applied", "file", path, "servers", len(s.pool.All()), "added", added, "draining", draining)
}
