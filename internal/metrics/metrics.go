// Package metrics exposes comfygate's Prometheus metrics: traffic through the
// gateway by route, authentication failures, use per key, ComfyUI's health,
// queue and VRAM, WebSockets and bytes. Everything lives in a private
// registry owned by a Metrics value, so tests can build many in parallel.
//
// Labels are bounded by construction: route labels (see package route),
// HTTP methods and status codes, key names from the key file, device names
// from ComfyUI. No label ever holds a raw path, a query or a key.
package metrics

import (
	"net/http"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/comfygate/comfygate/internal/reqscope"
	"github.com/comfygate/comfygate/internal/requestlog"
)

const namespace = "comfygate"

// Metrics owns the registry and every comfygate metric.
type Metrics struct {
	reg *prometheus.Registry

	requests         *prometheus.CounterVec
	requestDuration  *prometheus.HistogramVec
	upstreamDuration *prometheus.HistogramVec
	upstreamErrors   *prometheus.CounterVec
	authFailures     *prometheus.CounterVec
	keyRequests      *prometheus.CounterVec
	keyPrompts       *prometheus.CounterVec
	upstreamUp       prometheus.Gauge
	queuePending     prometheus.Gauge
	queueRunning     prometheus.Gauge
	vramTotal        *prometheus.GaugeVec
	vramFree         *prometheus.GaugeVec
	bytes            *prometheus.CounterVec
	keyReloads       *prometheus.CounterVec
	keysLoaded       prometheus.Gauge

	// The fleet's, by server (registered when there are several).
	fleetUp          *prometheus.GaugeVec
	fleetPending     *prometheus.GaugeVec
	fleetRunning     *prometheus.GaugeVec
	fleetDispatched  *prometheus.CounterVec
	fleetResubmitted *prometheus.CounterVec
	fleetStolen      *prometheus.CounterVec
	fleetErrors      *prometheus.CounterVec
}

// Sources are figures read at scrape time from other parts of comfygate.
type Sources struct {
	// OpenWebSockets counts proxied WebSockets now open.
	OpenWebSockets func() int
	// WebSocketBytes reports bytes carried by WebSockets so far, client to
	// ComfyUI (in) and back (out).
	WebSocketBytes func() (in, out int64)
}

// latencyBuckets suit a proxy in front of ComfyUI: sub-millisecond for
// cached JSON, seconds for /object_info and big graphs.
var latencyBuckets = []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30}

// New returns Metrics registered in a new private registry, with the Go and
// process collectors and comfygate_build_info.
func New(version string, src Sources) *Metrics {
	m := &Metrics{reg: prometheus.NewRegistry()}
	f := factory{m.reg}
	m.requests = f.counterVec("http_requests_total", "Requests answered, by route pattern, method and status code.", "route", "method", "code")
	m.requestDuration = f.histogramVec("http_request_duration_seconds", "Time to answer a request through the gateway, by route pattern (WebSockets are not timed here).", "route")
	m.upstreamDuration = f.histogramVec("upstream_request_duration_seconds", "Time until ComfyUI's response headers, by route pattern.", "route")
	m.upstreamErrors = f.counterVec("upstream_errors_total", "Requests that got no answer from ComfyUI, by reason (unreachable, timeout, broken, no_upstream).", "reason")
	m.authFailures = f.counterVec("auth_failures_total", "Requests refused by the gateway, by reason (missing, invalid, scope, locked_out, rate_limited, cross_site).", "reason")
	m.keyRequests = f.counterVec("key_requests_total", "Requests made with each API key, by key name.", "key")
	m.keyPrompts = f.counterVec("key_prompts_total", "Prompts queued (POST /prompt answered 200) with each API key, by key name.", "key")
	m.upstreamUp = f.gauge("upstream_up", "1 if the last background check of ComfyUI succeeded, else 0.")
	m.queuePending = f.gauge("comfyui_queue_pending", "Prompts waiting in ComfyUI's queue at the last check.")
	m.queueRunning = f.gauge("comfyui_queue_running", "Prompts running in ComfyUI at the last check.")
	m.vramTotal = f.gaugeVec("comfyui_vram_total_bytes", "Memory of each ComfyUI device at the last check.", "device")
	m.vramFree = f.gaugeVec("comfyui_vram_free_bytes", "Free memory of each ComfyUI device at the last check.", "device")
	m.bytes = f.counterVec("proxied_bytes_total", "HTTP body bytes carried through the gateway: in is request bodies, out is response bodies (WebSockets: comfygate_websocket_bytes_total).", "direction")
	m.keyReloads = f.counterVec("key_reloads_total", "Key file reloads, by result (ok, failed).", "result")
	m.keysLoaded = f.gauge("keys_loaded", "API keys in force.")

	build := f.gaugeVec("build_info", "Always 1; the version label says which comfygate is running.", "version")
	build.WithLabelValues(version).Set(1)
	if src.OpenWebSockets != nil {
		m.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Namespace: namespace, Name: "websockets_open", Help: "Proxied WebSockets open now.",
		}, func() float64 { return float64(src.OpenWebSockets()) }))
	}
	if src.WebSocketBytes != nil {
		m.reg.MustRegister(wsBytesCollector{desc: prometheus.NewDesc(namespace+"_websocket_bytes_total",
			"Bytes carried by WebSockets, by direction (in: to ComfyUI, out: from it).", []string{"direction"}, nil), read: src.WebSocketBytes})
	}
	for _, r := range []string{"ok", "failed"} {
		m.keyReloads.WithLabelValues(r)
	}
	for _, d := range []string{"in", "out"} {
		m.bytes.WithLabelValues(d)
	}
	m.reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// EnableFleet registers the fleet's metrics, each with an upstream label.
func (m *Metrics) EnableFleet() {
	f := factory{m.reg}
	m.fleetUp = f.gaugeVec("fleet_upstream_up", "1 if the fleet's last poll of the ComfyUI server succeeded, else 0.", "upstream")
	m.fleetPending = f.gaugeVec("fleet_queue_pending", "Prompts waiting on each ComfyUI server at the last poll.", "upstream")
	m.fleetRunning = f.gaugeVec("fleet_queue_running", "Prompts running on each ComfyUI server at the last poll.", "upstream")
	m.fleetDispatched = f.counterVec("fleet_prompts_dispatched_total", "Prompts queued by the fleet, by the server chosen.", "upstream")
	m.fleetResubmitted = f.counterVec("fleet_prompts_resubmitted_total", "Prompts queued again because their server died or lost them, by the server they went to.", "upstream")
	m.fleetStolen = f.counterVec("fleet_prompts_stolen_total", "Waiting prompts moved to an idle server, by the server they went to.", "upstream")
	m.fleetErrors = f.counterVec("fleet_upstream_errors_total", "Requests that got no answer from a ComfyUI server, by server and reason.", "upstream", "reason")
}

// EnableReplica registers the gauges of a replica that shares state in
// Redis (--redis): whether Redis answers, and, in fleet mode (acting not
// nil), whether this replica holds the fleet's lease.
func (m *Metrics) EnableReplica(redisUp, acting func() bool) {
	gauge := func(f func() bool) func() float64 {
		return func() float64 {
			if f() {
				return 1
			}
			return 0
		}
	}
	m.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Namespace: namespace, Name: "redis_up",
		Help: "1 if the shared Redis (--redis) answered its last check (cached for a second), else 0.",
	}, gauge(redisUp)))
	if acting != nil {
		m.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Namespace: namespace, Name: "fleet_acting",
			Help: "1 if this replica holds the fleet's lease (it requeues and moves prompts), else 0.",
		}, gauge(acting)))
	}
}

// FleetServer records one server's state at a fleet poll.
func (m *Metrics) FleetServer(name string, up bool, pending, running int) {
	if m.fleetUp == nil {
		return
	}
	if !up {
		m.fleetUp.WithLabelValues(name).Set(0)
		return
	}
	m.fleetUp.WithLabelValues(name).Set(1)
	m.fleetPending.WithLabelValues(name).Set(float64(pending))
	m.fleetRunning.WithLabelValues(name).Set(float64(running))
}

// FleetServerGone forgets the series of a server that left the fleet.
func (m *Metrics) FleetServerGone(name string) {
	if m.fleetUp == nil {
		return
	}
	for _, g := range []*prometheus.GaugeVec{m.fleetUp, m.fleetPending, m.fleetRunning} {
		g.DeleteLabelValues(name)
	}
}

// PromptDispatched counts a prompt the fleet queued on server.
func (m *Metrics) PromptDispatched(server string) {
	if m.fleetDispatched != nil {
		m.fleetDispatched.WithLabelValues(server).Inc()
	}
}

// PromptResubmitted counts a prompt queued again on server to.
func (m *Metrics) PromptResubmitted(_, to string) {
	if m.fleetResubmitted != nil {
		m.fleetResubmitted.WithLabelValues(to).Inc()
	}
}

// PromptStolen counts a waiting prompt moved to the idle server to.
func (m *Metrics) PromptStolen(_, to string) {
	if m.fleetStolen != nil {
		m.fleetStolen.WithLabelValues(to).Inc()
	}
}

// Registry returns the private registry (tests, extra collectors).
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// Handler serves the registry in the Prometheus text format.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{Registry: m.reg})
}

// knownMethods keeps the method label bounded.
var knownMethods = map[string]bool{"GET": true, "HEAD": true, "POST": true, "PUT": true, "PATCH": true, "DELETE": true, "OPTIONS": true}

// Observe records a finished request; it is a requestlog.Observer.
func (m *Metrics) Observe(r *requestlog.Result) {
	pattern, kind := r.Scope.Route.Label, r.Scope.Route.Kind
	method := r.Method
	if !knownMethods[method] {
		method = "other"
	}
	m.requests.WithLabelValues(pattern, method, strconv.Itoa(r.Status)).Inc()
	if kind != "ws" {
		m.requestDuration.WithLabelValues(pattern).Observe(r.Duration.Seconds())
	}
	if f := r.Scope.AuthFailure; f != "" {
		m.authFailures.WithLabelValues(f).Inc()
	}
	if k := r.Scope.KeyName; k != "" {
		m.keyRequests.WithLabelValues(k).Inc()
		if kind == "prompt" && r.Method == http.MethodPost && r.Status == http.StatusOK {
			m.keyPrompts.WithLabelValues(k).Inc()
		}
	}
	if r.BytesIn > 0 {
		m.bytes.WithLabelValues("in").Add(float64(r.BytesIn))
	}
	if r.BytesOut > 0 {
		m.bytes.WithLabelValues("out").Add(float64(r.BytesOut))
	}
}

// Device is one ComfyUI device's memory.
type Device struct {
	Name        string
	Total, Free int64
}

// SetUpstream records the result of a background check of ComfyUI.
func (m *Metrics) SetUpstream(up bool, pending, running int, devices []Device) {
	if !up {
		m.upstreamUp.Set(0)
		return
	}
	m.upstreamUp.Set(1)
	m.queuePending.Set(float64(pending))
	m.queueRunning.Set(float64(running))
	m.vramTotal.Reset()
	m.vramFree.Reset()
	for _, d := range devices {
		m.vramTotal.WithLabelValues(d.Name).Set(float64(d.Total))
		m.vramFree.WithLabelValues(d.Name).Set(float64(d.Free))
	}
}

// KeyReload records a key-file reload and the number of keys in force.
func (m *Metrics) KeyReload(ok bool, keys int) {
	if ok {
		m.keyReloads.WithLabelValues("ok").Inc()
	} else {
		m.keyReloads.WithLabelValues("failed").Inc()
	}
	m.keysLoaded.Set(float64(keys))
}

// SetKeys records the number of keys in force.
func (m *Metrics) SetKeys(n int) { m.keysLoaded.Set(float64(n)) }

// factory registers metrics under the comfygate namespace.
type factory struct{ reg *prometheus.Registry }

func (f factory) counterVec(name, help string, labels ...string) *prometheus.CounterVec {
	c := prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: namespace, Name: name, Help: help}, labels)
	f.reg.MustRegister(c)
	return c
}

func (f factory) histogramVec(name, help string, labels ...string) *prometheus.HistogramVec {
	h := prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: namespace, Name: name, Help: help, Buckets: latencyBuckets}, labels)
	f.reg.MustRegister(h)
	return h
}

func (f factory) gauge(name, help string) prometheus.Gauge {
	g := prometheus.NewGauge(prometheus.GaugeOpts{Namespace: namespace, Name: name, Help: help})
	f.reg.MustRegister(g)
	return g
}

func (f factory) gaugeVec(name, help string, labels ...string) *prometheus.GaugeVec {
	g := prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: namespace, Name: name, Help: help}, labels)
	f.reg.MustRegister(g)
	return g
}

// wsBytesCollector reads the WebSocket byte counters at scrape time.
type wsBytesCollector struct {
	desc *prometheus.Desc
	read func() (in, out int64)
}

func (c wsBytesCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }

func (c wsBytesCollector) Collect(ch chan<- prometheus.Metric) {
	in, out := c.read()
	ch <- prometheus.MustNewConstMetric(c.desc, prometheus.CounterValue, float64(in), "in")
	ch <- prometheus.MustNewConstMetric(c.desc, prometheus.CounterValue, float64(out), "out")
}

// ObserveExchange records one exchange with ComfyUI (proxy.Options.Observe):
// d is the time to its response headers, or reason why there was none. The
// route label is the one in r's scope.
func (m *Metrics) ObserveExchange(r *http.Request, d time.Duration, reason string) {
	if reason != "" {
		m.upstreamErrors.WithLabelValues(reason).Inc()
		if m.fleetErrors != nil {
			server := reqscope.From(r.Context()).Upstream
			if server == "" {
				server = "none"
			}
			m.fleetErrors.WithLabelValues(server, reason).Inc()
		}
		return
	}
	label := reqscope.From(r.Context()).Route.Label
	if label == "" {
		label = "other" // a request nobody classified
	}
	m.upstreamDuration.WithLabelValues(label).Observe(d.Seconds())
}
