// Command comfygate is an API-key front door for ComfyUI: it stands in front
// of an unmodified ComfyUI server, checks API keys, answers /health, and
// passes everything else through unchanged.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"runtime/debug"
	"strings"
	"syscall"

	"github.com/comfygate/comfygate/internal/config"
	"github.com/comfygate/comfygate/internal/server"
)

// version is set at build time: go build -ldflags "-X main.version=v1.2.3".
var version = ""

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Environ(), os.Stdin, os.Stdout, os.Stderr)
	stop()
	if errors.Is(err, errUsage) {
		os.Exit(2)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "comfygate:", err)
		var cfgErr *config.Error
		if errors.As(err, &cfgErr) {
			os.Exit(2)
		}
		os.Exit(1)
	}
}

// run is comfygate without the process: it returns when ctx is done and the
// server has shut down, or at once on a configuration error. environ is the
// environment as os.Environ gives it.
func run(ctx context.Context, args, environ []string, stdin io.Reader, stdout, stderr io.Writer) error {
	if len(args) > 0 && args[0] == "keys" {
		return runKeys(args[1:], stdin, stdout, stderr)
	}
	if len(args) > 0 && args[0] == "demo" {
		return runDemo(ctx, args[1:], environ, stdout, stderr)
	}
	cfg, err := config.LoadEnviron(args, environ)
	switch {
	case errors.Is(err, config.ErrHelp):
		config.Usage(stdout)
		return nil
	case errors.Is(err, config.ErrVersion):
		fmt.Fprintln(stdout, "comfygate", Version())
		return nil
	case err != nil:
		return err
	}

	logger := newLogger(cfg, stderr)
	for _, w := range cfg.Warnings {
		logger.Warn(w)
	}
	if cfg.CheckConfig {
		fmt.Fprintf(stdout, "configuration OK: %s, upstream %s, listening on %s\n",
			plural(len(cfg.Keys), "key"), upstreams(cfg), strings.Join(cfg.Addrs(), ", "))
		if !cfg.AuthEnabled() {
			fmt.Fprintf(stdout, "authentication is OFF: no API key is configured, so anyone who can reach %s can use ComfyUI; set --api-key-file\n",
				strings.Join(cfg.Addrs(), ", "))
		}
		return nil
	}

	srv, err := server.New(cfg, logger, Version(), stderr)
	if err != nil {
		return err
	}
	lns, err := srv.Listen()
	if err != nil {
		return err
	}
	metricsLn, err := srv.ListenMetrics()
	if err != nil {
		for _, ln := range lns {
			ln.Close()
		}
		return err
	}
	if metricsLn != nil {
		logger.Info("metrics and probes listening", "url", "http://"+metricsLn.Addr().String()+"/metrics")
	}
	// SIGHUP re-reads the key file at once (it is also watched).
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	go func() {
		for {
			select {
			case <-hup:
				srv.ReloadKeys()
			case <-ctx.Done():
				return
			}
		}
	}()
	scheme := "http"
	if cfg.TLS() {
		scheme = "https"
	}
	for _, ln := range lns {
		logger.Info("comfygate listening",
			"url", scheme+"://"+ln.Addr().String(),
			"upstream", upstreams(cfg),
			"auth", cfg.AuthEnabled(),
			"keys", len(cfg.Keys),
			"protect_ws", cfg.ProtectWS,
			"version", Version())
	}
	return srv.Serve(ctx, lns, metricsLn)
}

// plural writes n and noun, with an s unless n is 1.
func plural(n int, noun string) string {
	if n == 1 {
		return "1 " + noun
	}
	return fmt.Sprintf("%d %ss", n, noun)
}

// upstreams names the ComfyUI servers for the start-up lines.
func upstreams(cfg *config.Config) string {
	if cfg.UpstreamsFile != "" {
		return fmt.Sprintf("%d server(s) from %s", len(cfg.Upstreams), cfg.UpstreamsFile)
	}
	var out []string
	for _, u := range cfg.Upstreams {
		s := u.URL.Redacted()
		if u.Name != u.URL.Host {
			s = u.Name + "=" + s
		}
		out = append(out, s)
	}
	return strings.Join(out, ", ")
}

func newLogger(cfg *config.Config, w io.Writer) *slog.Logger {
	var level slog.Level
	level.UnmarshalText([]byte(cfg.LogLevel)) // validated by config.Load
	opts := &slog.HandlerOptions{Level: level}
	if cfg.LogFormat == "text" {
		return slog.New(slog.NewTextHandler(w, opts))
	}
	return slog.New(slog.NewJSONHandler(w, opts))
}

// Version is the build's version: the -X value, else the module version or
// VCS revision Go recorded, else "dev".
func Version() string {
	if version != "" {
		return version
	}
	if bi, ok := debug.ReadBuildInfo(); ok {
		if v := bi.Main.Version; v != "" && v != "(devel)" {
			return v
		}
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" && len(s.Value) >= 12 {
				return "dev-" + s.Value[:12]
			}
		}
	}
	return "dev"
}
