// Package server assembles comfygate: the handler chain in front of ComfyUI,
// the listeners, and graceful shutdown.
package server

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"time"

	"github.com/comfygate/comfygate/internal/audit"
	"github.com/comfygate/comfygate/internal/auth"
	"github.com/comfygate/comfygate/internal/clientip"
	"github.com/comfygate/comfygate/internal/config"
	"github.com/comfygate/comfygate/internal/fleet"
	"github.com/comfygate/comfygate/internal/health"
	"github.com/comfygate/comfygate/internal/hub"
	"github.com/comfygate/comfygate/internal/login"
	"github.com/comfygate/comfygate/internal/metrics"
	"github.com/comfygate/comfygate/internal/proxy"
	"github.com/comfygate/comfygate/internal/ratelimit"
	"github.com/comfygate/comfygate/internal/requestlog"
	"github.com/comfygate/comfygate/internal/session"
	"github.com/comfygate/comfygate/internal/upstream"
)

// Server is a configured comfygate, ready to serve.
type Server struct {
	cfg     *config.Config
	log     *slog.Logger
	keys    *auth.Reloader
	audit   *audit.Log
	metrics *metrics.Metrics
	pool    *upstream.Pool
	proxy   *proxy.Proxy
	// fleet and hub route over several servers (nil with one).
	fleet *fleet.Fleet
	hub   *hub.Hub
	// fleetNames are the servers the metrics last heard of.
	fleetNames map[string]bool
	health     *health.Checker
	monitor    *health.Monitor
	// sessions holds browser sessions (nil when login is off or no keys).
	sessions session.Store
	// state makes the stores replicas share (in memory without --redis).
	state   state
	handler http.Handler
	// via names this process in the Via header it adds to what it
	// forwards, to recognise a request that comes back to it (a loop).
	via string
	// metricsHandler serves --metrics-listen (nil when it is not set).
	metricsHandler http.Handler
}

// viaName is a name for this process, unique enough that a gateway in
// front of another gateway is no loop, while one in front of itself is.
func viaName() string {
	var b [6]byte
	rand.Read(b[:])
	return "comfygate-" + hex.EncodeToString(b[:])
}

// New builds the handler chain for cfg. version is reported by /health; the
// audit trail goes to auditOut unless cfg.AuditLog names a file.
func New(cfg *config.Config, logger *slog.Logger, version string, auditOut io.Writer) (*Server, error) {
	return newServer(cfg, logger, version, auditOut, nil)
}

// newServer is New with the transport to ComfyUI replaceable (benchmarks).
func newServer(cfg *config.Config, logger *slog.Logger, version string, auditOut io.Writer, transport http.RoundTripper) (*Server, error) {
	s := &Server{cfg: cfg, log: logger, via: viaName()}
	var err error
	if s.audit, err = audit.Open(cfg.AuditLog, auditOut); err != nil {
		return nil, fmt.Errorf("--audit-log: %w", err)
	}
	clients := clientip.New(cfg.TrustedProxies)
	s.keys = auth.NewReloader(cfg.KeyFile, cfg.StaticKeys, cfg.Keys[len(cfg.StaticKeys):], logger)
	s.metrics = metrics.New(version, metrics.Sources{
		OpenWebSockets: func() int { return s.proxy.OpenStreams() },
		WebSocketBytes: func() (int64, int64) { return s.proxy.StreamBytes() },
	})
	s.metrics.SetKeys(s.keys.KeySet().Len())
	specs := make([]upstream.Spec, len(cfg.Upstreams))
	for i, u := range cfg.Upstreams {
		specs[i] = upstream.Spec{Name: u.Name, URL: u.URL}
	}
	s.pool, err = upstream.NewPool(specs, upstream.Options{
		ResponseHeaderTimeout: cfg.UpstreamTimeout,
		Transport:             transport, // nil outside tests
	})
	if err != nil {
		return nil, err
	}
	for i, u := range s.pool.All() {
		u.SetDraining(cfg.Upstreams[i].Drain)
	}
	s.proxy = proxy.New(s.pool, proxy.Options{
		StripCredentials: len(cfg.Keys) > 0,
		MaxBodyBytes:     cfg.MaxBodyBytes,
		CORSOrigin:       cfg.CORSOrigin,
		Observe:          s.metrics.ObserveExchange,
		TrustForwarded:   clients.FromTrustedProxy,
		Via:              s.via,
		UserHeader:       cfg.Isolation,
		Logger:           logger,
	})
	s.keys.OnChange(s.keysChanged)
	s.state = newState(cfg, s)
	lockout := s.state.lockout(cfg.LockoutAttempts, cfg.LockoutWindow)

	// The end of the chain: ComfyUI through the proxy, or, with several
	// servers, the fleet, which routes each request by its route and
	// carries the sockets through the hub. comfygate's own endpoints: the
	// probes never need a key; /metrics is behind the key on the main
	// listener, or on --metrics-listen without.
	var (
		end    http.Handler = s.proxy
		public map[string]http.Handler
	)
	if cfg.Fleet() || cfg.Isolation {
		s.metrics.EnableFleet()
		s.hub = hub.New(fleetRouter{s}, hub.Options{Isolation: cfg.Isolation, Logger: logger, Relay: s.state.relay(logger)})
		s.fleet = fleet.New(s.pool, s.proxy, fleet.Options{
			Store:        s.state.fleetStore(),
			Leases:       s.state.leases(),
			PollInterval: cfg.FleetPollInterval,
			PollTimeout:  cfg.HealthTimeout,
			MaxBodyBytes: cfg.MaxBodyBytes,
			Hub:          s.hub,
			ClientID:     s.hub.ID,
			Isolation:    cfg.Isolation,
			Events: fleet.Events{
				Dispatched:  s.metrics.PromptDispatched,
				Resubmitted: s.metrics.PromptResubmitted,
				Stolen:      s.metrics.PromptStolen,
				Polled:      s.fleetPolled,
			},
			Logger: logger,
		})
		end = s.fleet
		fh := health.NewFleet(s.fleetStatus, version, cfg.MaxQueue)
		fh.Replica = s.state.replica(s.fleet.Acting)
		public = map[string]http.Handler{"/health": fh, "/health/live": fh.Live(), "/health/ready": s.state.ready(fh.Ready())}
	} else {
		s.health = health.New(cfg.Upstream, health.Options{
			Timeout:        cfg.HealthTimeout,
			TTL:            cfg.HealthTTL,
			GatewayVersion: version,
			Logger:         logger,
			Replica:        s.state.replica(nil),
		})
		s.monitor = health.NewMonitor(s.health, cfg.MetricsInterval, cfg.MaxQueue, s.upstreamChecked)
		public = map[string]http.Handler{
			"/health":       s.health,
			"/health/live":  s.monitor.Live(),
			"/health/ready": s.state.ready(s.monitor.Ready()),
		}
	}
	if s.state.rdb != nil {
		var acting func() bool
		if s.fleet != nil {
			acting = s.fleet.Acting
		}
		s.metrics.EnableReplica(s.state.redisUp, acting)
	}
	upstream := end
	if cfg.MetricsListen == "" {
		upstream = routes(map[string]http.Handler{"/metrics": s.metrics.Handler()}, end)
	} else {
		own := map[string]http.Handler{"/metrics": s.metrics.Handler()}
		for p, h := range public {
			own[p] = h
		}
		s.metricsHandler = Chain(routes(own, http.NotFoundHandler()),
			requestlog.Middleware(logger, auth.RedactQuery, clients.Resolve, cfg.ProtectWS, nil))
	}

	// Browser login, when keys are configured: /login and /logout, and
	// session cookies accepted in place of a key.
	authOpts := auth.Options{Lockout: lockout, OnLockout: s.lockedOut}
	loginRoutes := func(next http.Handler) http.Handler { return next }
	if cfg.Login && len(cfg.Keys) > 0 {
		s.sessions = s.state.sessions(cfg.SessionTTL)
		authOpts.Sessions, authOpts.LoginPath = s.sessions, login.Path
		lh := &login.Handler{
			Keys:      s.keys,
			Sessions:  s.sessions,
			Attempts:  s.state.limiter("login", 5.0/60, 5), // 5 a minute per address
			Lockout:   lockout,
			OnLockout: s.lockedOut,
			Secure: func(r *http.Request) bool {
				return r.TLS != nil || (clients.FromTrustedProxy(r) && r.Header.Get("X-Forwarded-Proto") == "https")
			},
		}
		loginRoutes = func(next http.Handler) http.Handler {
			return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if r.URL.Path == login.Path || r.URL.Path == login.LogoutPath {
					lh.ServeHTTP(w, r)
					return
				}
				next.ServeHTTP(w, r)
			})
		}
	}

	// The chain, outermost first:
	//   requestlog  the request's scope, with the client address and the
	//               route entry (route.Classify), each found once; one line
	//               per request (key names and redacted paths only) and
	//               the metrics
	//   routes      the probes, never behind the key
	//   guard       methods ComfyUI never needs, bodies on public GETs,
	//               preflights for protected routes, body deadlines
	//   audit       one line per state-changing request, refusals included
	//   login       /login and /logout (browser sessions), before the key check
	//   auth        lockout, API keys, sessions and scopes; a no-op without keys
	//   ratelimit   per-key request and prompt limits
	//   /metrics    on the main listener (unless --metrics-listen)
	//   proxy       ComfyUI, credentials stripped, bodies capped (or the
	//               fleet, which routes by route over the proxy)
	s.handler = Chain(
		routes(public, Chain(upstream,
			guard(guardOptions{BodyTimeout: cfg.BodyTimeout, CORSOrigin: cfg.CORSOrigin, Via: s.via, Logger: logger}),
			s.audit.Middleware(),
			loginRoutes,
			auth.Middleware(s.keys, authOpts),
			ratelimit.Middleware(
				s.state.limiter("requests", cfg.KeyRateLimit, cfg.KeyRateLimit),
				s.state.limiter("prompts", cfg.KeyPromptLimit/60, cfg.KeyPromptLimit),
			),
		)),
		requestlog.Middleware(logger, auth.RedactQuery, clients.Resolve, cfg.ProtectWS, s.metrics.Observe),
	)
	return s, nil
}

// upstreamChecked feeds each background check of ComfyUI to the metrics.
func (s *Server) upstreamChecked(rep *health.Report) {
	for _, u := range s.pool.All() {
		u.SetHealthy(rep.Healthy())
	}
	if !rep.Healthy() {
		s.metrics.SetUpstream(false, 0, 0, nil)
		return
	}
	devices := make([]metrics.Device, len(rep.Devices))
	for i, d := range rep.Devices {
		devices[i] = metrics.Device{Name: d.Name, Total: d.Total, Free: d.Free}
	}
	s.metrics.SetUpstream(true, rep.Queue.Pending, rep.Queue.Running, devices)
}

// keysChanged closes the WebSockets of removed keys and audits the reload.
func (s *Server) keysChanged(c auth.Change) {
	s.metrics.KeyReload(c.Err == nil, c.Keys)
	if c.Err != nil {
		s.audit.Write(audit.Event{Audit: "key_reload", Outcome: "failed", Detail: c.Err.Error()})
		return
	}
	ids := make(map[[32]byte]bool, len(c.Removed))
	names := make([]string, len(c.Removed))
	for i, k := range c.Removed {
		ids[k.ID()] = true
		names[i] = k.Name
	}
	closed := 0
	if s.sessions != nil && len(ids) > 0 {
		// Each replica does this; the first to get there ends the
		// sessions. Should the store be down, the sessions still end:
		// a session whose key is gone is refused and deleted when used.
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		for id := range ids {
			if _, err := s.sessions.DeleteKey(ctx, id); err != nil {
				s.log.Warn("could not end the browser sessions of a removed key now; they are refused when used", "err", err)
			}
		}
		cancel()
	}
	if len(ids) > 0 {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		closed = s.proxy.CloseStreamsOf(ctx, ids)
		cancel()
		if s.hub != nil {
			closed += s.hub.CloseKeys(ids)
		}
	}
	detail := fmt.Sprintf("%d keys in force", c.Keys)
	if c.Keys == 1 {
		detail = "1 key in force"
	}
	if len(names) > 0 {
		detail += fmt.Sprintf("; removed %s; closed %d WebSockets", strings.Join(names, ", "), closed)
	}
	s.audit.Write(audit.Event{Audit: "key_reload", Outcome: "ok", Detail: detail})
}

func (s *Server) lockedOut(r *http.Request, client netip.Addr, d time.Duration) {
	s.log.Warn("client locked out after repeated failed key attempts", "client", client.String(), "for", d.String())
	s.audit.Write(audit.Event{
		Audit: "lockout", Client: client.String(), Method: r.Method, Outcome: "locked_out",
		Detail: fmt.Sprintf("%d failed attempts within %s; locked out for %s", s.cfg.LockoutAttempts, s.cfg.LockoutWindow, d),
	})
}

// ReloadKeys re-reads the key file now (SIGHUP).
func (s *Server) ReloadKeys() error { return s.keys.Reload() }

// Middleware wraps a handler.
type Middleware func(http.Handler) http.Handler

// Chain wraps h in mw so that mw[0] is the outermost layer: a request meets
// mw[0] first, then mw[1], and h last.
func Chain(h http.Handler, mw ...Middleware) http.Handler {
	for i := len(mw) - 1; i >= 0; i-- {
		h = mw[i](h)
	}
	return h
}

// routes serves the handlers in own, by exact path, for GET and HEAD, and
// sends everything else on. It does not use http.ServeMux, which would
// redirect unclean paths such as //prompt instead of passing them to
// ComfyUI unchanged.
func routes(own map[string]http.Handler, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodGet || r.Method == http.MethodHead {
			if h, ok := own[r.URL.Path]; ok {
				h.ServeHTTP(w, r)
				return
			}
		}
		next.ServeHTTP(w, r)
	})
}

// Metrics returns the metrics, for tests.
func (s *Server) Metrics() *metrics.Metrics { return s.metrics }

// Handler returns the whole handler chain.
func (s *Server) Handler() http.Handler { return s.handler }

// Proxy returns the proxy, for tests that count open WebSockets.
func (s *Server) Proxy() *proxy.Proxy { return s.proxy }

// Listen binds every configured address. A port already in use gets an
// error that says what to do about it.
func (s *Server) Listen() ([]net.Listener, error) {
	var lns []net.Listener
	for _, addr := range s.cfg.Addrs() {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			for _, l := range lns {
				l.Close()
			}
			if addrInUse(err) {
				if s.cfg.Port == 8188 {
					// ComfyUI's own default port: most likely ComfyUI.
					return nil, fmt.Errorf("cannot listen on %s: the port is already in use, most likely by ComfyUI, whose default port it is. "+
						"Start ComfyUI on another port (python main.py --port 8189) "+
						"and point comfygate at it with --upstream http://127.0.0.1:8189; or give comfygate another --port", addr)
				}
				return nil, fmt.Errorf("cannot listen on %s: the port is already in use by another program (another comfygate?); "+
					"stop it or give comfygate another --port", addr)
			}
			return nil, fmt.Errorf("cannot listen on %s: %w", addr, err)
		}
		lns = append(lns, ln)
	}
	return lns, nil
}

// ListenMetrics binds --metrics-listen, or returns nil when it is not set.
func (s *Server) ListenMetrics() (net.Listener, error) {
	if s.cfg.MetricsListen == "" {
		return nil, nil
	}
	ln, err := net.Listen("tcp", s.cfg.MetricsListen)
	if err != nil {
		return nil, fmt.Errorf("--metrics-listen: cannot listen on %s: %w", s.cfg.MetricsListen, err)
	}
	return ln, nil
}

// Serve serves on lns (and on metricsLn, if not nil, the metrics and probes)
// until ctx is done, then shuts down gracefully:
// in-flight requests get cfg.ShutdownTimeout to finish, and every WebSocket
// is closed with code 1001. It returns nil after a clean shutdown.
func (s *Server) Serve(ctx context.Context, lns []net.Listener, metricsLn net.Listener) error {
	srv := s.httpServer(ctx, s.handler)
	if s.cfg.TLS() {
		cert, err := tls.LoadX509KeyPair(s.cfg.TLSCertFile, s.cfg.TLSKeyFile)
		if err != nil {
			return fmt.Errorf("loading TLS certificate: %w", err)
		}
		srv.TLSConfig = &tls.Config{
			Certificates: []tls.Certificate{cert},
			MinVersion:   tls.VersionTLS12,
			NextProtos:   []string{"http/1.1"},
		}
	}

	errc := make(chan error, len(lns)+1)
	var wg sync.WaitGroup
	watchCtx, stopWatch := context.WithCancel(ctx)
	defer stopWatch()
	wg.Go(func() { s.keys.Watch(watchCtx, s.cfg.KeyPollInterval) })
	if s.fleet != nil {
		wg.Go(func() { s.fleet.Run(watchCtx, nil) })
		wg.Go(func() { s.hub.Run(watchCtx) })
		if s.cfg.UpstreamsFile != "" {
			wg.Go(func() { s.watchUpstreams(watchCtx, s.cfg.KeyPollInterval) })
		}
	} else {
		wg.Go(func() { s.monitor.Run(watchCtx) })
	}
	var metricsSrv *http.Server
	if metricsLn != nil && s.metricsHandler != nil {
		metricsSrv = s.httpServer(ctx, s.metricsHandler)
		wg.Go(func() {
			if err := metricsSrv.Serve(metricsLn); err != nil && !errors.Is(err, http.ErrServerClosed) {
				errc <- err
			}
		})
	}
	for _, ln := range lns {
		if srv.TLSConfig != nil {
			ln = tls.NewListener(ln, srv.TLSConfig)
		}
		wg.Go(func() {
			if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				errc <- err
			}
		})
	}

	var serveErr error
	select {
	case <-ctx.Done():
	case serveErr = <-errc:
	}
	s.log.Info("shutting down", "timeout", s.cfg.ShutdownTimeout.String(), "websockets", s.proxy.OpenStreams())
	shCtx, cancel := context.WithTimeout(context.Background(), s.cfg.ShutdownTimeout)
	defer cancel()
	var streams sync.WaitGroup
	streams.Go(func() { s.proxy.CloseStreams(shCtx) })
	if s.hub != nil {
		s.hub.Close()
	}
	if metricsSrv != nil {
		metricsSrv.Shutdown(shCtx)
	}
	if err := srv.Shutdown(shCtx); err != nil {
		s.log.Warn("shutdown timed out; closing the remaining connections", "err", err)
		srv.Close()
	}
	s.proxy.Close()
	streams.Wait()
	stopWatch()
	wg.Wait()
	s.state.close()
	s.audit.Close()
	return serveErr
}

// httpServer returns the net/http server for h, with the limits every
// listener gets: a deadline on request headers (bodies have theirs in
// guard), an idle timeout, a cap on header size, and HTTP/1.1 only.
//
// There is no ReadTimeout: it would cut long uploads, and net/http lets it
// cancel the context of any request still running when it expires.
// WriteTimeout would cut downloads and generations the same way.
func (s *Server) httpServer(ctx context.Context, h http.Handler) *http.Server {
	srv := &http.Server{
		Handler:           h,
		ReadHeaderTimeout: s.cfg.HeaderTimeout,
		IdleTimeout:       s.cfg.IdleTimeout,
		// aiohttp, which serves ComfyUI, refuses heads over 32 KiB anyway.
		MaxHeaderBytes: 64 << 10,
		ErrorLog:       slog.NewLogLogger(s.log.Handler(), slog.LevelWarn),
		// Requests outlive the signal that starts a graceful shutdown.
		BaseContext: func(net.Listener) context.Context { return context.WithoutCancel(ctx) },
	}
	// HTTP/1.1 only: ComfyUI's WebSocket needs an HTTP/1.1 upgrade, and it
	// keeps the HTTP/2 server code (and its advisories) out of the binary's
	// attack surface.
	srv.Protocols = new(http.Protocols)
	srv.Protocols.SetHTTP1(true)
	return srv
}
