// Package health answers GET /health: whether ComfyUI is up, with its
// version, queue, device and VRAM, in the shape the seed document gives.
//
// A flood of /health calls must not become a flood on ComfyUI, so one check
// serves every caller that arrives while it runs and every caller for TTL
// after it finished.
package health

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"sync"
	"time"
)

// Options configure a Checker.
type Options struct {
	// Timeout bounds one check of ComfyUI (both calls). Default 3s.
	Timeout time.Duration
	// TTL is how long a finished check answers later callers. Default 1s.
	TTL time.Duration
	// Client makes the calls to ComfyUI. Nil means a client with its own
	// small transport.
	Client *http.Client
	// GatewayVersion is reported as gateway_version.
	GatewayVersion string
	// Logger receives the changes of ComfyUI's state: down (warn, with the
	// details), still down (warn, every StillDownEvery), up again (info,
	// with the downtime). Every failed check is logged at debug. Nil means
	// slog.Default().
	Logger *slog.Logger
	// StillDownEvery is how often a ComfyUI that stays down is logged
	// again. Default 5m.
	StillDownEvery time.Duration
	// Now returns the current time. Nil means time.Now; tests set a clock.
	Now func() time.Time
	// Replica, if set, describes this replica in /health (--redis).
	Replica func(context.Context) *Replica
}

// DefaultStillDownEvery is the default Options.StillDownEvery.
const DefaultStillDownEvery = 5 * time.Minute

// maxBody caps what is read from ComfyUI; /queue holds whole workflow graphs.
const maxBody = 64 << 20

// Report is the /health document. A healthy report has every field but
// Error; an unhealthy one has Status, Error and Timestamp.
type Report struct {
	Status         string  `json:"status"`
	Version        string  `json:"version,omitempty"`
	Timestamp      float64 `json:"timestamp"`
	Queue          *Queue  `json:"queue,omitempty"`
	Device         string  `json:"device,omitempty"`
	VRAM           *VRAM   `json:"vram,omitempty"`
	Error          string  `json:"error,omitempty"`
	GatewayVersion string  `json:"gateway_version,omitempty"`
	// Replica describes this gateway among replicas that share state
	// (--redis); absent otherwise.
	Replica *Replica `json:"replica,omitempty"`

	// Devices lists every device ComfyUI reported, for metrics.
	Devices []Device `json:"-"`

	// err is the detail of an unhealthy report, for the log only.
	err error
}

// Replica is one gateway replica among several that share state in
// Redis (--redis).
type Replica struct {
	// ID names the replica: the client id its hub uses on the servers.
	ID string `json:"id"`
	// Redis is "ok", or why Redis cannot be used (no address, no secret).
	Redis string `json:"redis"`
	// Acting reports that this replica holds the fleet's lease: it is the
	// one that queues a dead server's prompts again and moves prompts.
	Acting bool `json:"acting"`
}

// Device is one of ComfyUI's devices and its memory in bytes.
type Device struct {
	Name        string
	Total, Free int64
}

// Queue counts ComfyUI's prompts.
type Queue struct {
	Pending int `json:"pending"`
	Running int `json:"running"`
}

// VRAM is the primary device's memory in bytes.
type VRAM struct {
	Total int64 `json:"total"`
	Free  int64 `json:"free"`
	Used  int64 `json:"used"`
}

// Healthy reports whether the report says ComfyUI is healthy.
func (r *Report) Healthy() bool { return r.Status == "healthy" }

// Checker checks ComfyUI and serves /health.
type Checker struct {
	base *url.URL
	opts Options
	log  *slog.Logger

	mu     sync.Mutex
	last   *Report
	lastAt time.Time
	call   *call
	state  upstreamState
}

// upstreamState is what the log has been told about ComfyUI, so that it
// hears of changes rather than of every check.
type upstreamState struct {
	down     bool
	since    time.Time // when the first failed check of this outage ended
	logged   time.Time // when the outage was last logged
	failures int       // failed checks in this outage
}

type call struct {
	done   chan struct{}
	report *Report
}

// New returns a Checker for the ComfyUI at base.
func New(base *url.URL, opts Options) *Checker {
	if opts.Timeout <= 0 {
		opts.Timeout = 3 * time.Second
	}
	if opts.TTL <= 0 {
		opts.TTL = time.Second
	}
	if opts.StillDownEvery <= 0 {
		opts.StillDownEvery = DefaultStillDownEvery
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.Client == nil {
		opts.Client = &http.Client{Transport: &http.Transport{
			Proxy:               nil,
			DialContext:         (&net.Dialer{Timeout: opts.Timeout}).DialContext,
			MaxIdleConnsPerHost: 2,
			IdleConnTimeout:     30 * time.Second,
		}}
	}
	c := &Checker{base: base, opts: opts, log: opts.Logger}
	if c.log == nil {
		c.log = slog.Default()
	}
	return c
}

// ServeHTTP answers 200 with a healthy report or 503 with an unhealthy one.
func (c *Checker) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	rep := c.Check(r.Context())
	if c.opts.Replica != nil {
		rep.Replica = c.opts.Replica(r.Context())
	}
	body, _ := json.Marshal(rep)
	h := w.Header()
	h.Set("Content-Type", "application/json; charset=utf-8")
	h.Set("Cache-Control", "no-store")
	if rep.Healthy() {
		w.WriteHeader(http.StatusOK)
	} else {
		w.WriteHeader(http.StatusServiceUnavailable)
	}
	w.Write(append(body, '\n'))
}

// Check returns a recent report: a cached one if it is younger than TTL, the
// result of the check in progress if there is one, or a new check's.
func (c *Checker) Check(ctx context.Context) *Report {
	c.mu.Lock()
	if c.last != nil && c.opts.Now().Sub(c.lastAt) < c.opts.TTL {
		rep := c.last
		c.mu.Unlock()
		return rep
	}
	if cl := c.call; cl != nil {
		c.mu.Unlock()
		select {
		case <-cl.done:
			return cl.report
		case <-ctx.Done():
			return c.unhealthy("the health check was cancelled", ctx.Err())
		}
	}
	cl := &call{done: make(chan struct{})}
	c.call = cl
	c.mu.Unlock()

	// The check runs on its own context: other callers share its result, so
	// it must not stop because this caller went away.
	checkCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), c.opts.Timeout)
	rep := c.probe(checkCtx)
	cancel()

	c.mu.Lock()
	c.last, c.lastAt, c.call = rep, c.opts.Now(), nil
	logChange := c.observe(rep)
	c.mu.Unlock()
	cl.report = rep
	close(cl.done)
	logChange()
	return rep
}

// systemStats is the part of GET /system_stats that /health reads. Every
// field is optional across ComfyUI versions.
type systemStats struct {
	System *struct {
		ComfyUIVersion string `json:"comfyui_version"`
	} `json:"system"`
	Devices []struct {
		Name      string `json:"name"`
		Type      string `json:"type"`
		Index     *int   `json:"index"`
		VRAMTotal int64  `json:"vram_total"`
		VRAMFree  int64  `json:"vram_free"`
	} `json:"devices"`
}

type queueDoc struct {
	Running []json.RawMessage `json:"queue_running"`
	Pending []json.RawMessage `json:"queue_pending"`
}

func (c *Checker) probe(ctx context.Context) *Report {
	var (
		stats systemStats
		queue queueDoc
		wg    sync.WaitGroup
		errs  [2]error
	)
	wg.Go(func() { errs[0] = c.getJSON(ctx, "/system_stats", &stats) })
	wg.Go(func() { errs[1] = c.getJSON(ctx, "/queue", &queue) })
	wg.Wait()
	if err := errors.Join(errs[:]...); err != nil {
		return c.unhealthy(clientMessage(err, c.opts.Timeout), err)
	}
	if stats.System == nil || len(stats.Devices) == 0 {
		err := errors.New("/system_stats has no system or no devices")
		return c.unhealthy("ComfyUI answered /system_stats with something that is not system stats", err)
	}
	if queue.Running == nil || queue.Pending == nil {
		err := errors.New("/queue has no queue_running or queue_pending")
		return c.unhealthy("ComfyUI answered /queue with something that is not a queue", err)
	}
	devices := make([]Device, len(stats.Devices))
	for i, dev := range stats.Devices {
		devices[i] = Device{Name: deviceName(dev.Type, dev.Index, dev.Name), Total: dev.VRAMTotal, Free: dev.VRAMFree}
	}
	d := stats.Devices[0] // ComfyUI lists the primary device first
	version := stats.System.ComfyUIVersion
	if version == "" {
		version = "unknown" // builds before late 2024 do not report it
	}
	used := d.VRAMTotal - d.VRAMFree
	if used < 0 {
		used = 0
	}
	return &Report{
		Status:         "healthy",
		Version:        version,
		Timestamp:      unixSeconds(c.opts.Now()),
		Queue:          &Queue{Pending: len(queue.Pending), Running: len(queue.Running)},
		Device:         deviceName(d.Type, d.Index, d.Name),
		VRAM:           &VRAM{Total: d.VRAMTotal, Free: d.VRAMFree, Used: used},
		GatewayVersion: c.opts.GatewayVersion,
		Devices:        devices,
	}
}

// deviceName gives the torch device string, such as "cuda:0" or "cpu".
func deviceName(typ string, index *int, name string) string {
	switch {
	case typ == "":
		if name == "" {
			return "unknown"
		}
		return name
	case index == nil:
		return typ
	default:
		return fmt.Sprintf("%s:%d", typ, *index)
	}
}

// upstreamError is a failed call, with a message safe for clients.
type upstreamError struct {
	safe string
	err  error
}

func (e *upstreamError) Error() string { return e.err.Error() }
func (e *upstreamError) Unwrap() error { return e.err }

func (c *Checker) getJSON(ctx context.Context, path string, v any) error {
	u := c.base.JoinPath(path)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return err
	}
	req.Header.Set("Accept", "application/json")
	req.Header.Set("User-Agent", "comfygate-health-check/"+c.opts.GatewayVersion)
	resp, err := c.opts.Client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		io.Copy(io.Discard, io.LimitReader(resp.Body, 4096))
		return &upstreamError{
			safe: fmt.Sprintf("ComfyUI answered %s with status %d", path, resp.StatusCode),
			err:  fmt.Errorf("GET %s: status %d", path, resp.StatusCode),
		}
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, maxBody)).Decode(v); err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return &upstreamError{
			safe: fmt.Sprintf("ComfyUI's answer to %s is not valid JSON", path),
			err:  fmt.Errorf("GET %s: %w", path, err),
		}
	}
	return nil
}

// clientMessage turns a check error into a sentence without internal details.
func clientMessage(err error, timeout time.Duration) string {
	var ue *upstreamError
	var ne net.Error
	switch {
	case errors.As(err, &ue):
		return ue.safe
	case errors.Is(err, context.DeadlineExceeded), errors.As(err, &ne) && ne.Timeout():
		return fmt.Sprintf("ComfyUI did not answer within %s", timeout)
	default:
		return "ComfyUI is not reachable"
	}
}

func (c *Checker) unhealthy(msg string, err error) *Report {
	return &Report{
		Status:         "unhealthy",
		Error:          msg,
		Timestamp:      unixSeconds(c.opts.Now()),
		GatewayVersion: c.opts.GatewayVersion,
		err:            err,
	}
}

// observe updates what is known of ComfyUI's state with the report of a
// check that just finished, and returns what to log about it, to be called
// once c.mu is released. While ComfyUI is down, a check every few seconds
// (the background monitor's, and /health's) would otherwise log a warning
// each: hundreds of identical lines an hour. The log hears of the outage
// when it starts, every StillDownEvery while it lasts, and when it ends.
func (c *Checker) observe(rep *Report) func() {
	now := c.opts.Now()
	st := &c.state
	if rep.Healthy() {
		if !st.down {
			return func() {}
		}
		downFor, failures := now.Sub(st.since), st.failures
		*st = upstreamState{}
		return func() {
			c.log.Info("ComfyUI is up again", "upstream", c.base.Redacted(), "down_for", roundDuration(downFor).String(), "failed_checks", failures)
		}
	}
	msg, err := rep.Error, rep.err
	if !st.down {
		*st = upstreamState{down: true, since: now, logged: now, failures: 1}
		return func() {
			c.log.Warn("ComfyUI is down: health check failed", "upstream", c.base.Redacted(), "reason", msg, "err", err)
		}
	}
	st.failures++
	if now.Sub(st.logged) < c.opts.StillDownEvery {
		return func() { c.log.Debug("health check failed", "upstream", c.base.Redacted(), "reason", msg, "err", err) }
	}
	st.logged = now
	downFor, failures := now.Sub(st.since), st.failures
	return func() {
		c.log.Warn("ComfyUI is still down", "upstream", c.base.Redacted(), "down_for", roundDuration(downFor).String(), "failed_checks", failures, "reason", msg, "err", err)
	}
}

// roundDuration rounds d for a log line: whole seconds, or milliseconds
// under a second.
func roundDuration(d time.Duration) time.Duration {
	if d < time.Second {
		return d.Round(time.Millisecond)
	}
	return d.Round(time.Second)
}

func unixSeconds(t time.Time) float64 {
	return float64(t.UnixMilli()) / 1000
}

// SetClient replaces the client used to reach ComfyUI (tests).
func (c *Checker) SetClient(hc *http.Client) { c.opts.Client = hc }
