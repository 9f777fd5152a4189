// Package server assembles comfygate: the handler chain in front of ComfyUI,
// the listeners, and graceful shutdown.
package server

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"syscall"
	"time"

	"github.com/comfygate/comfygate/internal/auth"
	"github.com/comfygate/comfygate/internal/config"
	"github.com/comfygate/comfygate/internal/health"
	"github.com/comfygate/comfygate/internal/proxy"
	"github.com/comfygate/comfygate/internal/requestlog"
)

// Server is a configured comfygate, ready to serve.
type Server struct {
	cfg     *config.Config
	log     *slog.Logger
	proxy   *proxy.Proxy
	health  *health.Checker
	handler http.Handler
}

// New builds the handler chain for cfg. version is reported by /health.
func New(cfg *config.Config, logger *slog.Logger, version string) *Server {
	return newServer(cfg, logger, version, nil)
}

// newServer is New with the transport to ComfyUI replaceable (benchmarks).
func newServer(cfg *config.Config, logger *slog.Logger, version string, transport http.RoundTripper) *Server {
	s := &Server{cfg: cfg, log: logger}
	keys := auth.NewKeySet(cfg.Keys...)
	s.proxy = proxy.New(cfg.Upstream, proxy.Options{
		StripCredentials:      keys.Enabled(),
		MaxBodyBytes:          cfg.MaxBodyBytes,
		ResponseHeaderTimeout: cfg.UpstreamTimeout,
		Transport:             transport,
		Logger:                logger,
	})
	s.health = health.New(cfg.Upstream, health.Options{
		Timeout:        cfg.HealthTimeout,
		GatewayVersion: version,
		Logger:         logger,
	})

	// The chain, outermost first:
	//   requestlog  one line per request, key names and redacted paths only
	//   routes      comfygate's own endpoints (/health), never behind the key
	//   auth        API keys; identity when none are configured
	//   proxy       ComfyUI, credentials stripped, bodies capped
	s.handler = Chain(
		routes(s.health, Chain(s.proxy, auth.Middleware(keys, auth.Options{ProtectWS: cfg.ProtectWS}))),
		requestlog.Middleware(logger, auth.RedactQuery),
	)
	return s
}

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

// routes serves comfygate's own endpoints and sends everything else on.
// It does not use http.ServeMux, which would redirect unclean paths such as
// //prompt instead of passing them to ComfyUI unchanged.
func routes(h *health.Checker, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/health" && (r.Method == http.MethodGet || r.Method == http.MethodHead) {
			h.ServeHTTP(w, r)
			return
		}
		next.ServeHTTP(w, r)
	})
}

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
			if errors.Is(err, syscall.EADDRINUSE) {
				return nil, fmt.Errorf("cannot listen on %s: the port is already in use. "+
					"If ComfyUI itself runs on it, start ComfyUI on another port (python main.py --port 8189) "+
					"and point comfygate at it with --upstream http://127.0.0.1:8189; or give comfygate another --port", addr)
			}
			return nil, fmt.Errorf("cannot listen on %s: %w", addr, err)
		}
		lns = append(lns, ln)
	}
	return lns, nil
}

// Serve serves on lns until ctx is done, then shuts down gracefully:
// in-flight requests get cfg.ShutdownTimeout to finish, and every WebSocket
// is closed with code 1001. It returns nil after a clean shutdown.
func (s *Server) Serve(ctx context.Context, lns []net.Listener) error {
	srv := &http.Server{
		Handler:           s.handler,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    1 << 20,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelWarn),
		BaseContext:       func(net.Listener) context.Context { return context.WithoutCancel(ctx) },
	}
	// HTTP/1.1 only: ComfyUI's WebSocket needs an HTTP/1.1 upgrade, and it
	// keeps the HTTP/2 server code (and its advisories) out of the binary's
	// attack surface.
	srv.Protocols = new(http.Protocols)
	srv.Protocols.SetHTTP1(true)
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

	errc := make(chan error, len(lns))
	var wg sync.WaitGroup
	for _, ln := range lns {
		if s.cfg.TLS() {
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
	if err := srv.Shutdown(shCtx); err != nil {
		s.log.Warn("shutdown timed out; closing the remaining connections", "err", err)
		srv.Close()
	}
	streams.Wait()
	wg.Wait()
	return serveErr
}
