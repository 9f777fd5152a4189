// Package config reads comfygate's command line and COMFYGATE_* environment
// variables into a Config, and validates it once, reporting every problem at
// the same time.
package config

import (
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/pflag"

	"github.com/comfygate/comfygate/internal/auth"
	"github.com/comfygate/comfygate/internal/clientip"
)

// EnvPrefix is the prefix of the environment variable that mirrors each flag:
// --api-key-file is COMFYGATE_API_KEY_FILE.
const EnvPrefix = "COMFYGATE_"

// Config is comfygate's validated configuration. Nothing reads flags or the
// environment after Load.
type Config struct {
	// Listen holds the addresses to listen on (host names or IPs, no port).
	// Default 127.0.0.1. A comma-separated flag gives several.
	Listen []string
	// Port is the TCP port for every listen address. Default 8188, the port
	// ComfyUI clients expect.
	Port int
	// Upstream is ComfyUI's base URL. Default http://127.0.0.1:8189.
	Upstream *url.URL
	// Keys are the API keys, hashed: StaticKeys followed by the key file's.
	// Empty means authentication is off and comfygate is a pure pass-through
	// (plus /health).
	Keys []auth.Key
	// StaticKeys holds the --api-key key, which a key-file reload keeps.
	StaticKeys []auth.Key
	// KeyFile is the --api-key-file path, watched for changes ("" if none).
	KeyFile string
	// TrustedProxies are the peers whose X-Forwarded-For names the client.
	TrustedProxies []netip.Prefix
	// LockoutAttempts failed attempts within LockoutWindow lock a client
	// address out for LockoutWindow. 0 disables the lockout. Default 10 in 5m.
	LockoutAttempts int
	LockoutWindow   time.Duration
	// KeyRateLimit is requests per second per key (0: none); KeyPromptLimit
	// is prompts per minute per key (0: none).
	KeyRateLimit, KeyPromptLimit float64
	// AuditLog is the audit trail's file; "" writes it to stderr.
	AuditLog string
	// Login serves /login and accepts browser sessions when keys are set.
	// Default true.
	Login bool
	// SessionTTL is how long a browser session lasts. Default 12h.
	SessionTTL time.Duration
	// MetricsListen is a host:port serving /metrics and the probes without
	// a key. "" puts /metrics on the main listener, behind a key.
	MetricsListen string
	// MaxQueue makes /health/ready fail while ComfyUI's queue (pending plus
	// running) is at or above it; 0 is no limit.
	MaxQueue int
	// MetricsInterval is how often ComfyUI's queue and VRAM are polled in
	// the background for metrics and /health/ready. Default 5s.
	MetricsInterval time.Duration
	// ProtectWS makes /ws need a key too.
	ProtectWS bool
	// TLSCertFile and TLSKeyFile, both or neither, turn on HTTPS.
	TLSCertFile, TLSKeyFile string
	// MaxBodyBytes caps request bodies (--max-upload-size, in MB). Default 100 MB.
	MaxBodyBytes int64
	// HealthTimeout bounds one /health check of ComfyUI. Default 3s.
	HealthTimeout time.Duration
	// UpstreamTimeout bounds the wait for ComfyUI's response headers; 0 is
	// no limit. Default 5m. Bodies and WebSockets are never timed out.
	UpstreamTimeout time.Duration
	// ShutdownTimeout bounds how long in-flight requests may finish after
	// SIGINT or SIGTERM. Default 15s.
	ShutdownTimeout time.Duration
	// HeaderTimeout bounds reading a request's headers. Default 10s.
	HeaderTimeout time.Duration
	// BodyTimeout is how long a request body may go without a byte arriving
	// (a client that sends headers and then nothing). Default 30s.
	BodyTimeout time.Duration
	// IdleTimeout is how long an idle keep-alive client connection is kept.
	// Default 2m.
	IdleTimeout time.Duration
	// CORSOrigin, as ComfyUI's --enable-cors-header: the origin allowed to
	// make cross-site requests ("*" for any), or "" for none. comfygate
	// answers preflights for protected routes itself with it, and adds the
	// CORS headers to answers that lack them.
	CORSOrigin string
	// LogFormat is "json" (default) or "text"; LogLevel is debug, info, warn or error.
	LogFormat, LogLevel string
	// CheckConfig means: validate, report and exit.
	CheckConfig bool

	// HealthTTL is how long a finished /health check answers later callers
	// (health.Options.TTL), and KeyPollInterval how often the key file is
	// checked for changes. They are not flags: Load sets both to 1s, and
	// only tests lower them.
	HealthTTL, KeyPollInterval time.Duration

	// Warnings are problems that do not stop start-up (a short key, a key
	// on the command line, an open listener without keys).
	Warnings []string
}

// Errors for the caller to branch on.
var (
	// ErrHelp means --help was given; the usage has been written.
	ErrHelp = pflag.ErrHelp
	// ErrVersion means --version was given.
	ErrVersion = errors.New("version requested")
)

// raw holds flag values before validation.
type raw struct {
	listen, upstream, apiKey, apiKeyFile string
	certFile, keyFile                    string
	port                                 int
	maxUploadMB                          float64
	healthTimeout, upstreamTimeout       time.Duration
	shutdownTimeout                      time.Duration
	headerTimeout, bodyTimeout           time.Duration
	idleTimeout                          time.Duration
	corsOrigin                           string
	protectWS, checkConfig, version      bool
	logFormat, logLevel                  string
	trustedProxies                       []string
	lockoutAttempts                      int
	lockoutWindow                        time.Duration
	keyRate, keyPrompts                  float64
	auditLog                             string
	metricsListen                        string
	login                                bool
	sessionTTL                           time.Duration
	maxQueue                             int
	metricsInterval                      time.Duration
}

func newFlagSet(r *raw) *pflag.FlagSet {
	fs := pflag.NewFlagSet("comfygate", pflag.ContinueOnError)
	fs.SortFlags = false
	fs.StringVar(&r.listen, "listen", "127.0.0.1", "address(es) to listen on, comma-separated; 0.0.0.0 for every IPv4 interface")
	fs.IntVar(&r.port, "port", 8188, "port to listen on")
	fs.StringVar(&r.upstream, "upstream", "http://127.0.0.1:8189", "ComfyUI's base URL")
	fs.StringVar(&r.apiKey, "api-key", "", "an API key clients must send (prefer --api-key-file: the command line is visible to other users)")
	fs.StringVar(&r.apiKeyFile, "api-key-file", "", "file with API keys, one per line; blank lines and # comments are ignored")
	fs.BoolVar(&r.protectWS, "protect-ws", false, "require a key on the /ws WebSocket too (header, or ?api_key= / ?token=)")
	fs.StringVar(&r.certFile, "tls-certfile", "", "TLS certificate file (PEM); with --tls-keyfile, serve HTTPS")
	fs.StringVar(&r.keyFile, "tls-keyfile", "", "TLS private key file (PEM); with --tls-certfile, serve HTTPS")
	fs.StringSliceVar(&r.trustedProxies, "trusted-proxy", nil, "CIDRs of proxies in front of comfygate whose X-Forwarded-For names the client (comma-separated)")
	fs.IntVar(&r.lockoutAttempts, "lockout-attempts", 10, "failed key attempts from one address within --lockout-window that lock it out (0: never)")
	fs.DurationVar(&r.lockoutWindow, "lockout-window", 5*time.Minute, "window for counting failed attempts, and how long a lockout lasts")
	fs.Float64Var(&r.keyRate, "key-rate-limit", 0, "requests per second allowed per key (0: no limit)")
	fs.Float64Var(&r.keyPrompts, "key-prompt-limit", 0, "prompts per minute allowed per key (0: no limit)")
	fs.StringVar(&r.auditLog, "audit-log", "", "append the audit trail (JSON lines) to this file instead of stderr")
	fs.BoolVar(&r.login, "login", true, "serve a login page at /login so browsers (the ComfyUI web UI) can sign in with a key and use a session cookie")
	fs.DurationVar(&r.sessionTTL, "session-ttl", 12*time.Hour, "how long a browser session lasts")
	fs.StringVar(&r.metricsListen, "metrics-listen", "", "host:port for /metrics and the probes without a key (default: /metrics on the main port, behind a key)")
	fs.IntVar(&r.maxQueue, "max-queue", 0, "/health/ready fails while ComfyUI's queue holds this many prompts or more (0: no limit)")
	fs.DurationVar(&r.metricsInterval, "metrics-interval", 5*time.Second, "how often ComfyUI's queue and VRAM are checked in the background")
	fs.Float64Var(&r.maxUploadMB, "max-upload-size", 100, "largest request body in MB; larger bodies get 413")
	fs.DurationVar(&r.healthTimeout, "health-timeout", 3*time.Second, "how long /health waits for ComfyUI")
	fs.DurationVar(&r.upstreamTimeout, "upstream-timeout", 5*time.Minute, "how long to wait for ComfyUI's response headers (0: no limit)")
	fs.DurationVar(&r.shutdownTimeout, "shutdown-timeout", 15*time.Second, "how long in-flight requests may finish on SIGINT/SIGTERM")
	fs.DurationVar(&r.headerTimeout, "header-timeout", 10*time.Second, "how long a client may take to send a request's headers")
	fs.DurationVar(&r.bodyTimeout, "body-timeout", 30*time.Second, "how long a request body may go without a byte arriving")
	fs.DurationVar(&r.idleTimeout, "idle-timeout", 2*time.Minute, "how long an idle keep-alive client connection is kept")
	fs.StringVar(&r.corsOrigin, "enable-cors-header", "", "allow cross-site requests from this origin, as ComfyUI's flag of the same name (bare flag: *)")
	fs.StringVar(&r.logFormat, "log-format", "json", "log format: json or text")
	fs.StringVar(&r.logLevel, "log-level", "info", "log level: debug, info, warn or error")
	fs.BoolVar(&r.checkConfig, "check-config", false, "validate the configuration and key file, then exit")
	fs.BoolVar(&r.version, "version", false, "print the version and exit")
	fs.BoolP("help", "h", false, "show this help")
	return fs
}

// bareCORSFlag gives a bare --enable-cors-header (last, or followed by
// another flag) the value "*", as ComfyUI's flag of the same name takes it;
// "--enable-cors-header ORIGIN" keeps working too.
func bareCORSFlag(args []string) []string {
	out := make([]string, 0, len(args))
	for i, a := range args {
		if a == "--" {
			return append(out, args[i:]...)
		}
		if a == "--enable-cors-header" && (i+1 == len(args) || strings.HasPrefix(args[i+1], "-")) {
			a += "=*"
		}
		out = append(out, a)
	}
	return out
}

// EnvName is the environment variable that mirrors flag name.
func EnvName(flag string) string {
	return EnvPrefix + strings.ToUpper(strings.ReplaceAll(flag, "-", "_"))
}

// Usage writes the help text.
func Usage(w io.Writer) {
	fs := newFlagSet(&raw{})
	fmt.Fprintf(w, `comfygate: an API-key front door for ComfyUI.

Usage:
  comfygate [flags]
  comfygate keys new|hash|check ...   (make, hash and check keys; see comfygate keys --help)

Every flag can also be set by an environment variable: --api-key-file is
COMFYGATE_API_KEY_FILE, --protect-ws is COMFYGATE_PROTECT_WS. A flag given on
the command line wins over the environment.

Flags:
%s`, fs.FlagUsages())
}

// Load parses args (without the program name) and the environment seen
// through lookupEnv, validates the result and reads the key file. All
// problems are reported together in one error, each naming its flag.
func Load(args []string, lookupEnv func(string) (string, bool)) (*Config, error) {
	var r raw
	fs := newFlagSet(&r)
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	if err := fs.Parse(bareCORSFlag(args)); err != nil {
		return nil, &Error{Problems: []string{err.Error() + " (see comfygate --help)"}}
	}
	if help, _ := fs.GetBool("help"); help {
		return nil, ErrHelp
	}
	if r.version {
		return nil, ErrVersion
	}
	if fs.NArg() > 0 {
		return nil, &Error{Problems: []string{fmt.Sprintf("unexpected argument %q: comfygate takes only flags (see comfygate --help)", fs.Arg(0))}}
	}

	var problems []string
	fromEnv := map[string]bool{}
	fs.VisitAll(func(f *pflag.Flag) {
		if f.Changed || f.Name == "help" || f.Name == "version" {
			return
		}
		v, ok := lookupEnv(EnvName(f.Name))
		if !ok {
			return
		}
		if err := f.Value.Set(v); err != nil {
			problems = append(problems, fmt.Sprintf("%s: %q is not a valid %s", EnvName(f.Name), v, f.Value.Type()))
			return
		}
		fromEnv[f.Name] = true
	})
	name := func(flag string) string {
		if fromEnv[flag] {
			return EnvName(flag)
		}
		return "--" + flag
	}

	c := &Config{
		Port:            r.port,
		ProtectWS:       r.protectWS,
		TLSCertFile:     r.certFile,
		TLSKeyFile:      r.keyFile,
		HealthTimeout:   r.healthTimeout,
		UpstreamTimeout: r.upstreamTimeout,
		ShutdownTimeout: r.shutdownTimeout,
		HeaderTimeout:   r.headerTimeout,
		BodyTimeout:     r.bodyTimeout,
		IdleTimeout:     r.idleTimeout,
		CORSOrigin:      strings.TrimSpace(r.corsOrigin),
		LogFormat:       r.logFormat,
		LogLevel:        r.logLevel,
		CheckConfig:     r.checkConfig,
		MaxBodyBytes:    int64(r.maxUploadMB * 1024 * 1024),
		LockoutAttempts: r.lockoutAttempts,
		LockoutWindow:   r.lockoutWindow,
		KeyRateLimit:    r.keyRate,
		KeyPromptLimit:  r.keyPrompts,
		AuditLog:        r.auditLog,
		MetricsListen:   r.metricsListen,
		Login:           r.login,
		SessionTTL:      r.sessionTTL,
		MaxQueue:        r.maxQueue,
		MetricsInterval: r.metricsInterval,
		HealthTTL:       time.Second,
		KeyPollInterval: time.Second,
	}
	add := func(flag, format string, args ...any) {
		problems = append(problems, name(flag)+": "+fmt.Sprintf(format, args...))
	}

	// Listen addresses.
	for _, h := range strings.Split(r.listen, ",") {
		h = strings.TrimSpace(h)
		h = strings.TrimSuffix(strings.TrimPrefix(h, "["), "]")
		switch {
		case h == "":
			add("listen", "empty address in %q", r.listen)
		case strings.ContainsAny(h, "/ ") || (strings.Contains(h, ":") && net.ParseIP(h) == nil):
			add("listen", "%q is not a host name or IP address (give the port with --port)", h)
		default:
			c.Listen = append(c.Listen, h)
		}
	}
	if r.port < 1 || r.port > 65535 {
		add("port", "must be between 1 and 65535, got %d", r.port)
	}

	// Upstream.
	if u, err := url.Parse(r.upstream); err != nil {
		add("upstream", "not a URL: %v", err)
	} else if u.Scheme != "http" && u.Scheme != "https" {
		add("upstream", "scheme must be http or https, got %q (example: http://127.0.0.1:8189)", u.Scheme)
	} else if u.Host == "" {
		add("upstream", "no host in %q (example: http://127.0.0.1:8189)", r.upstream)
	} else if u.User != nil || u.RawQuery != "" || u.Fragment != "" {
		add("upstream", "must be a base URL without user info, query or fragment")
	} else {
		u.Path = strings.TrimSuffix(u.Path, "/")
		u.RawPath = ""
		c.Upstream = u
	}

	// Client addresses, lockout and limits.
	if p, err := clientip.ParsePrefixes(r.trustedProxies); err != nil {
		add("trusted-proxy", "%v (want CIDRs such as 10.0.0.0/8 or single addresses)", err)
	} else {
		c.TrustedProxies = p
	}
	if r.lockoutAttempts < 0 {
		add("lockout-attempts", "must not be negative, got %d", r.lockoutAttempts)
	}
	if r.lockoutWindow <= 0 {
		add("lockout-window", "must be positive, got %s", r.lockoutWindow)
	}
	if r.keyRate < 0 {
		add("key-rate-limit", "must not be negative, got %v", r.keyRate)
	}
	if r.keyPrompts < 0 {
		add("key-prompt-limit", "must not be negative, got %v", r.keyPrompts)
	}
	if r.auditLog != "" {
		// Check without creating the file: --check-config must change nothing.
		if f, err := os.OpenFile(r.auditLog, os.O_WRONLY|os.O_APPEND, 0); err == nil {
			f.Close()
		} else if !errors.Is(err, os.ErrNotExist) {
			add("audit-log", "cannot open %s for appending: %v", r.auditLog, unwrapPathError(err))
		} else if st, err := os.Stat(filepath.Dir(r.auditLog)); err != nil || !st.IsDir() {
			add("audit-log", "the directory of %s does not exist", r.auditLog)
		}
	}

	// Metrics and probes.
	if r.metricsListen != "" {
		if host, port, err := net.SplitHostPort(r.metricsListen); err != nil {
			add("metrics-listen", "%q is not host:port (example: 127.0.0.1:9188)", r.metricsListen)
		} else if p, err := strconv.Atoi(port); err != nil || p < 0 || p > 65535 {
			add("metrics-listen", "port %q is not a number from 0 to 65535", port)
		} else if strings.ContainsAny(host, "/ ") {
			add("metrics-listen", "%q is not a host name or IP address", host)
		}
	}
	if r.sessionTTL < time.Minute {
		add("session-ttl", "must be at least 1m, got %s", r.sessionTTL)
	}
	if r.maxQueue < 0 {
		add("max-queue", "must not be negative, got %d", r.maxQueue)
	}
	if r.metricsInterval < 100*time.Millisecond {
		add("metrics-interval", "must be at least 100ms, got %s", r.metricsInterval)
	}

	// Limits and timeouts.
	if r.maxUploadMB <= 0 {
		add("max-upload-size", "must be a positive number of MB, got %v", r.maxUploadMB)
	}
	if r.healthTimeout <= 0 {
		add("health-timeout", "must be positive, got %s", r.healthTimeout)
	}
	if r.upstreamTimeout < 0 {
		add("upstream-timeout", "must not be negative, got %s", r.upstreamTimeout)
	}
	if r.shutdownTimeout <= 0 {
		add("shutdown-timeout", "must be positive, got %s", r.shutdownTimeout)
	}
	for _, d := range []struct {
		flag string
		v    time.Duration
	}{{"header-timeout", r.headerTimeout}, {"body-timeout", r.bodyTimeout}, {"idle-timeout", r.idleTimeout}} {
		if d.v <= 0 {
			add(d.flag, "must be positive, got %s", d.v)
		}
	}
	if o := strings.TrimSpace(r.corsOrigin); o != "" && o != "*" {
		if u, err := url.Parse(o); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || (u.Path != "" && u.Path != "/") || u.RawQuery != "" {
			add("enable-cors-header", "want an origin such as https://app.example.com, or * for any; got %q", o)
		} else {
			c.CORSOrigin = u.Scheme + "://" + u.Host
		}
	}
	if r.logFormat != "json" && r.logFormat != "text" {
		add("log-format", "must be json or text, got %q", r.logFormat)
	}
	switch r.logLevel {
	case "debug", "info", "warn", "error":
	default:
		add("log-level", "must be debug, info, warn or error, got %q", r.logLevel)
	}

	// TLS: both files or neither, and they must load.
	switch {
	case (r.certFile == "") != (r.keyFile == ""):
		if r.certFile == "" {
			add("tls-certfile", "is required with %s", name("tls-keyfile"))
		} else {
			add("tls-keyfile", "is required with %s", name("tls-certfile"))
		}
	case r.certFile != "":
		if _, err := tls.LoadX509KeyPair(r.certFile, r.keyFile); err != nil {
			add("tls-certfile", "cannot load the certificate and key (%s, %s): %v", r.certFile, r.keyFile, err)
		}
	}

	// Keys.
	if fs.Changed("api-key") || fromEnv["api-key"] {
		if err := auth.CheckSecret(r.apiKey); err != nil {
			add("api-key", "%v", err)
		} else {
			c.StaticKeys = append(c.StaticKeys, auth.NewKey("api-key", r.apiKey))
			c.Keys = append(c.Keys, c.StaticKeys...)
		}
		if fs.Changed("api-key") {
			c.Warnings = append(c.Warnings, "--api-key on the command line is visible to other users of this machine (ps, /proc); prefer --api-key-file or COMFYGATE_API_KEY")
		}
	}
	if fs.Changed("api-key-file") || fromEnv["api-key-file"] {
		keys, warn, err := readKeyFile(r.apiKeyFile)
		if err != nil {
			add("api-key-file", "%v", err)
		}
		c.KeyFile = r.apiKeyFile
		c.Keys = append(c.Keys, keys...)
		c.Warnings = append(c.Warnings, warn...)
	}
	for _, k := range c.Keys {
		if k.Short {
			c.Warnings = append(c.Warnings, fmt.Sprintf("key %s is shorter than %d characters; generate a long random one, e.g. openssl rand -hex 32", k.Name, auth.MinRecommendedKeyLen))
		}
	}
	if len(c.Keys) == 0 {
		for _, h := range c.Listen {
			if !isLoopback(h) {
				c.Warnings = append(c.Warnings, fmt.Sprintf("listening on %s without an API key: anyone who can reach this port can use ComfyUI; set --api-key-file", h))
				break
			}
		}
	}

	if len(problems) > 0 {
		return nil, &Error{Problems: problems}
	}
	return c, nil
}

// Error lists every configuration problem.
type Error struct{ Problems []string }

func (e *Error) Error() string {
	return "invalid configuration:\n  " + strings.Join(e.Problems, "\n  ")
}

// readKeyFile reads and parses a key file. Its warnings cover file
// permissions; its error names every bad line.
func readKeyFile(path string) ([]auth.Key, []string, error) {
	if path == "" {
		return nil, nil, errors.New("is empty")
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, nil, fmt.Errorf("cannot read %s: %v", path, unwrapPathError(err))
	}
	defer f.Close()
	var warnings []string
	if st, err := f.Stat(); err == nil {
		if st.IsDir() {
			return nil, nil, fmt.Errorf("%s is a directory, not a key file", path)
		}
		// Windows has no such mode bits (Go reports every file as 0666 or
		// 0444); who may read the file is up to its ACL there.
		if runtime.GOOS != "windows" && st.Mode().Perm()&0o077 != 0 {
			warnings = append(warnings, fmt.Sprintf("key file %s can be read by other users (mode %04o); run chmod 600 %s", path, st.Mode().Perm(), path))
		}
	}
	keys, err := auth.ParseKeyFile(f)
	if err != nil {
		lines := strings.ReplaceAll(err.Error(), "\n", "; ")
		return nil, warnings, fmt.Errorf("%s: %s", path, lines)
	}
	if len(keys) == 0 {
		return nil, warnings, fmt.Errorf("%s holds no key (one key per line; # starts a comment)", path)
	}
	return keys, warnings, nil
}

func unwrapPathError(err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}

func isLoopback(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// Addrs returns the host:port pairs to listen on.
func (c *Config) Addrs() []string {
	addrs := make([]string, len(c.Listen))
	for i, h := range c.Listen {
		addrs[i] = net.JoinHostPort(h, strconv.Itoa(c.Port))
	}
	return addrs
}

// AuthEnabled reports whether any key is configured.
func (c *Config) AuthEnabled() bool { return len(c.Keys) > 0 }

// TLS reports whether comfygate serves HTTPS.
func (c *Config) TLS() bool { return c.TLSCertFile != "" }
