package health

import (
	"context"
	"net/http"
	"sync"
	"time"
)

// Dependency is something other than ComfyUI that the gateway needs to be
// ready: the Redis that replicas share (--redis). Its check runs at most
// once per TTL, however often the probe is called.
type Dependency struct {
	// Name names it in the probe's reason ("Redis (--redis)").
	Name string
	// Check returns nil when the dependency works, or an error whose text
	// is safe to show anyone (no address, no secret).
	Check func(ctx context.Context) error
	// Timeout bounds one check. Default 1s.
	Timeout time.Duration
	// TTL is how long a result answers later probes. Default 1s.
	TTL time.Duration

	mu   sync.Mutex
	at   time.Time
	last error
}

// Err returns the latest result of the check: nil when the dependency
// works. It checks again once the result is TTL old.
func (d *Dependency) Err(ctx context.Context) error { return d.check(ctx) }

// check returns the latest result, checking again once it is TTL old.
func (d *Dependency) check(ctx context.Context) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	ttl, timeout := d.TTL, d.Timeout
	if ttl <= 0 {
		ttl = time.Second
	}
	if timeout <= 0 {
		timeout = time.Second
	}
	if !d.at.IsZero() && time.Since(d.at) < ttl {
		return d.last
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), timeout)
	defer cancel()
	d.last, d.at = d.Check(ctx), time.Now()
	return d.last
}

// ReadyWith answers /health/ready as ready does, except that it answers
// 503 first, with the reason, while a dependency's check fails.
func ReadyWith(ready http.Handler, deps ...*Dependency) http.Handler {
	if len(deps) == 0 {
		return ready
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		for _, d := range deps {
			if err := d.check(r.Context()); err != nil {
				writeProbe(w, http.StatusServiceUnavailable, probeBody{Status: "not_ready", Reason: d.Name + ": " + err.Error()})
				return
			}
		}
		ready.ServeHTTP(w, r)
	})
}
