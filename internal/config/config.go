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
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/pflag"

	"github.com/comfygate/comfygate/internal/auth"
	"github.com/comfygate/comfygate/internal/clientip"
	"github.com/comfygate/comfygate/internal/redisstate"
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
	// Upstream is ComfyUI's base URL, the first of Upstreams. Default
	// http://127.0.0.1:8189.
	Upstream *url.URL
	// Upstreams are the ComfyUI servers (--upstream, repeated, or
	// --upstreams-file). More than one, or a file, is fleet mode.
	Upstreams []UpstreamSpec
	// UpstreamsFile is the --upstreams-file path, watched for changes.
	UpstreamsFile string
	// Isolation keeps each key to its own prompts, outputs and uploads
	// (--isolation keys).
	Isolation bool
	// FleetPollInterval is how often the fleet polls every server.
	// Default 2s; tests shorten it.
	FleetPollInterval time.Duration
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
	// Redis, when set (--redis), is the Redis that gateway replicas share:
	// browser sessions, the lockout and the per-key limits live there
	// instead of in memory. nil keeps everything in memory. Its String
	// hides the password.
	Redis *redisstate.URL
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
	listen, apiKey, apiKeyFile      string
	upstreams                       []string
	upstreamsFile, isolation        string
	certFile, keyFile               string
	port                            int
	maxUploadMB                     float64
	healthTimeout, upstreamTimeout  time.Duration
	shutdownTimeout                 time.Duration
	headerTimeout, bodyTimeout      time.Duration
	idleTimeout                     time.Duration
	corsOrigin                      string
	protectWS, checkConfig, version bool
	logFormat, logLevel             string
	trustedProxies                  []string
	lockoutAttempts                 int
	lockoutWindow                   time.Duration
	keyRate, keyPrompts             float64
	auditLog                        string
	metricsListen                   string
	login                           bool
	sessionTTL                      time.Duration
	redis                           string
	maxQueue                        int
	metricsInterval                 time.Duration
}

func newFlagSet(r *raw) *pflag.FlagSet {
	fs := pflag.NewFlagSet("comfygate", pflag.ContinueOnError)
	fs.SortFlags = false
	fs.StringVar(&r.listen, "listen", "127.0.0.1", "address(es) to listen on, comma-separated; 0.0.0.0 for every IPv4 interface")
	fs.IntVar(&r.port, "port", 8188, "port to listen on")
	fs.StringSliceVar(&r.upstreams, "upstream", []string{"http://127.0.0.1:8189"}, "ComfyUI's base URL; repeat it (or comma-separate) for a fleet of servers, each URL or NAME=URL")
	fs.StringVar(&r.isolation, "isolation", "off", "off, or keys: each key sees and touches only its own prompts, outputs and uploads (admin keys see all)")
	fs.StringVar(&r.upstreamsFile, "upstreams-file", "", "file with the fleet's servers, one URL or NAME=URL a line (optionally followed by drain); re-read when it changes")
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
	fs.StringVar(&r.redis, "redis", "", "redis://[:password@]host[:port][/db] (rediss:// for TLS) shared by several comfygate replicas: sessions, lockout and limits live there (default: in memory)")
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
  comfygate demo [--listen 127.0.0.1:8188]   (try it: a SIMULATED ComfyUI behind comfygate, with a fresh key)
  comfygate keys new|hash|check ...          (make, hash and check keys; see comfygate keys --help)

Every flag can also be set by an environment variable: --api-key-file is
COMFYGATE_API_KEY_FILE, --protect-ws is COMFYGATE_PROTECT_WS. A flag given on
the command line wins over the environment. Any other COMFYGATE_ variable
(a misspelt one, say) stops start-up, except COMFYGATE_URL and
COMFYGATE_TIMEOUT, which only the example clients read.

Flags:
%s`, fs.FlagUsages())
}

// Load parses args (without the program name) and the environment seen
// through lookupEnv, validates the result and reads the key file. All
// problems are reported together in one error, each naming its flag.
//
// Load cannot see which variables are set, only look them up, so it cannot
// refuse a misspelt one; the program calls LoadEnviron instead.
func Load(args []string, lookupEnv func(string) (string, bool)) (*Config, error) {
	return load(args, lookupEnv, nil)
}

// LoadEnviron is Load for an environment given as os.Environ gives it
// ("NAME=value" entries). On top of what Load checks, it refuses every set
// COMFYGATE_ variable that is not a flag's (nor one of ClientVariables):
// COMFYGATE_API_KEYFILE for COMFYGATE_API_KEY_FILE would otherwise start a
// gateway without a key.
func LoadEnviron(args, environ []string) (*Config, error) {
	lookup, names := envLookup(environ)
	return load(args, lookup, names)
}

// ClientVariables are COMFYGATE_ variables that comfygate's example clients
// and scripts read (the gateway's URL, how long a client waits) and that
// comfygate itself ignores, so that a shell set up for the examples can
// also start the gateway.
var ClientVariables = []string{"COMFYGATE_URL", "COMFYGATE_TIMEOUT"}

// envLookup indexes environ. Windows compares variable names without regard
// to case, as os.LookupEnv does there.
func envLookup(environ []string) (func(string) (string, bool), []string) {
	fold := func(s string) string { return s }
	if runtime.GOOS == "windows" {
		fold = strings.ToUpper
	}
	m := make(map[string]string, len(environ))
	var names []string
	for _, kv := range environ {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" { // Windows keeps "=C:=C:\dir" entries
			continue
		}
		if _, dup := m[fold(k)]; !dup {
			names = append(names, k)
		}
		m[fold(k)] = v
	}
	return func(k string) (string, bool) { v, ok := m[fold(k)]; return v, ok }, names
}

// unknownVariables returns a problem for every name in names that looks
// like one of comfygate's variables (the COMFYGATE_ prefix, in any case)
// but is not the variable of a flag in fs nor a client variable.
func unknownVariables(fs *pflag.FlagSet, names []string, lookupEnv func(string) (string, bool)) []string {
	value := func(name string) string { v, _ := lookupEnv(name); return v }
	known := map[string]bool{}
	var flagVars []string
	fs.VisitAll(func(f *pflag.Flag) {
		known[EnvName(f.Name)] = true
		if f.Name != "help" && f.Name != "version" {
			flagVars = append(flagVars, EnvName(f.Name))
		}
	})
	for _, n := range ClientVariables {
		known[n] = true
	}
	var problems []string
	for _, name := range names {
		upper := strings.ToUpper(name)
		if !strings.HasPrefix(upper, EnvPrefix) {
			continue
		}
		if known[name] || (runtime.GOOS == "windows" && known[upper]) {
			continue
		}
		var msg string
		switch {
		case known[upper]:
			msg = fmt.Sprintf("%s: variable names are upper case: did you mean %s?", name, upper)
		case serviceLink(upper, value(name)) != "":
			msg = fmt.Sprintf("%s: not a comfygate variable: Kubernetes sets it for the Service %q; set enableServiceLinks: false in the Pod spec",
				name, serviceLink(upper, value(name)))
		default:
			if s := suggest(upper, flagVars); s != "" {
				msg = fmt.Sprintf("%s: unknown variable: did you mean %s?", name, s)
			} else {
				msg = fmt.Sprintf("%s: unknown variable: no comfygate flag is called --%s; unset it (see comfygate --help)", name,
					strings.ToLower(strings.ReplaceAll(strings.TrimPrefix(upper, EnvPrefix), "_", "-")))
			}
		}
		problems = append(problems, msg)
	}
	return problems
}

// serviceLinkRE matches the variables Kubernetes puts in every container for
// each Service of the namespace, unless the Pod sets enableServiceLinks:
// false: for a Service "comfygate", COMFYGATE_SERVICE_HOST,
// COMFYGATE_SERVICE_PORT(_HTTP), COMFYGATE_PORT_8188_TCP(_PROTO|_PORT|_ADDR)
// and COMFYGATE_PORT=tcp://….
var serviceLinkRE = regexp.MustCompile(`^([A-Z0-9_]+?)_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT_[0-9]+_(TCP|UDP|SCTP)(_PROTO|_PORT|_ADDR)?|PORT)$`)

// serviceLink returns the name of the Kubernetes Service that the variable
// name=value describes, or "" if it is not a service link.
func serviceLink(name, value string) string {
	m := serviceLinkRE.FindStringSubmatch(name)
	if m == nil {
		return ""
	}
	if m[2] == "PORT" && !strings.Contains(value, "://") { // tcp://10.0.0.1:8188
		return ""
	}
	return strings.ToLower(strings.ReplaceAll(m[1], "_", "-"))
}

// suggest returns the candidate closest to name, or "" if none is close:
// within a few edits, or containing or contained in name's part after the
// prefix.
func suggest(name string, candidates []string) string {
	best, bestD := "", 4 // at most 3 edits
	short := strings.TrimPrefix(strings.TrimPrefix(name, EnvPrefix), "--")
	for _, c := range candidates {
		d := editDistance(name, c)
		cs := strings.TrimPrefix(strings.TrimPrefix(c, EnvPrefix), "--")
		if d >= bestD && len(short) >= 4 && (strings.Contains(cs, short) || strings.Contains(short, cs)) {
			d = 3 // a part of the name, or the name with something added
		}
		if d < bestD {
			best, bestD = c, d
		}
	}
	return best
}

// editDistance is the Levenshtein distance between a and b (bytes).
func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}

// flagProblem rewrites pflag's parse error, adding the likely flag to an
// unknown one.
func flagProblem(fs *pflag.FlagSet, err error) string {
	msg := err.Error()
	if name, ok := strings.CutPrefix(msg, "unknown flag: --"); ok {
		var flags []string
		fs.VisitAll(func(f *pflag.Flag) { flags = append(flags, "--"+f.Name) })
		if s := suggest("--"+name, flags); s != "" {
			return msg + ": did you mean " + s + "? (see comfygate --help)"
		}
	}
	return msg + " (see comfygate --help)"
}

func load(args []string, lookupEnv func(string) (string, bool), envNames []string) (*Config, error) {
	var r raw
	fs := newFlagSet(&r)
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	// Misspelt variables first: they are as likely to be why a flag seems
	// missing as anything on the command line.
	problems := unknownVariables(fs, envNames, lookupEnv)
	if err := fs.Parse(bareCORSFlag(args)); err != nil {
		return nil, &Error{Problems: append(problems, flagProblem(fs, err))}
	}
	if help, _ := fs.GetBool("help"); help {
		return nil, ErrHelp
	}
	if r.version {
		return nil, ErrVersion
	}
	if fs.NArg() > 0 {
		return nil, &Error{Problems: append(problems, fmt.Sprintf("unexpected argument %q: comfygate takes only flags (see comfygate --help)", fs.Arg(0)))}
	}

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
			msg := fmt.Sprintf("%s: %q is not a valid %s", EnvName(f.Name), v, f.Value.Type())
			if svc := serviceLink(EnvName(f.Name), v); svc != "" {
				msg += fmt.Sprintf("; Kubernetes sets it for the Service %q: set enableServiceLinks: false in the Pod spec", svc)
			}
			problems = append(problems, msg)
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

	// Upstreams.
	c.FleetPollInterval = 2 * time.Second
	switch {
	case r.upstreamsFile != "" && fs.Changed("upstream") || r.upstreamsFile != "" && fromEnv["upstream"]:
		add("upstreams-file", "give either %s or --upstreams-file, not both", name("upstream"))
	case r.upstreamsFile != "":
		c.UpstreamsFile = r.upstreamsFile
		specs, bad, err := ReadUpstreamsFile(r.upstreamsFile)
		if err != nil {
			add("upstreams-file", "%v", err)
		}
		for _, b := range bad {
			add("upstreams-file", "%s: %s", r.upstreamsFile, b)
		}
		if err == nil && len(bad) == 0 && len(specs) == 0 {
			add("upstreams-file", "%s lists no server", r.upstreamsFile)
		}
		c.Upstreams = specs
	default:
		for _, v := range r.upstreams {
			spec, err := ParseUpstream(v)
			if err != nil {
				add("upstream", "%v", err)
				continue
			}
			c.Upstreams = append(c.Upstreams, spec)
		}
		for _, p := range duplicateNames(c.Upstreams) {
			add("upstream", "%s", p)
		}
	}
	if len(c.Upstreams) > 0 {
		c.Upstream = c.Upstreams[0].URL
	}
	for _, u := range c.Upstreams {
		if pointsAtSelf(u.URL, c.Listen, c.Port) {
			add("upstream", "%s is comfygate's own address (--listen %s --port %d): point it at ComfyUI, which must listen on another port, such as 8189",
				u.URL.Redacted(), strings.Join(c.Listen, ","), c.Port)
		}
	}

	switch r.isolation {
	case "off", "":
	case "keys":
		c.Isolation = true
	default:
		add("isolation", "must be off or keys, got %q", r.isolation)
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
	if r.metricsListen != "" && len(c.Listen) > 0 && r.port >= 1 && r.port <= 65535 {
		if h := sharesAddress(r.metricsListen, c.Listen, r.port); h != "" {
			add("metrics-listen", "%s is taken by the main listener (--listen %s --port %d); give /metrics and the probes their own port, e.g. %s",
				r.metricsListen, h, r.port, net.JoinHostPort(loopbackOr(h), "9188"))
		}
	}
	if r.sessionTTL < time.Minute {
		add("session-ttl", "must be at least 1m, got %s", r.sessionTTL)
	}
	if r.maxQueue < 0 {
		add("max-queue", "must not be negative, got %d", r.maxQueue)
	}
	if fs.Changed("redis") || fromEnv["redis"] {
		switch u, err := redisstate.ParseURL(r.redis); {
		case strings.TrimSpace(r.redis) == "":
			add("redis", "is empty: give redis://host:6379 (or unset it to keep state in memory)")
		case err != nil:
			add("redis", "%v", err)
		default:
			c.Redis = u
			if fs.Changed("redis") && u.HasPassword() {
				c.Warnings = append(c.Warnings, "--redis on the command line shows its password to other users of this machine (ps, /proc); prefer COMFYGATE_REDIS")
			}
		}
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
		keys, warn, errs := readKeyFile(r.apiKeyFile)
		for _, err := range errs {
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
	if len(c.Keys) == 0 && len(problems) == 0 {
		c.Warnings = append(c.Warnings, authOffWarning(c))
	}
	if c.Isolation && len(c.Keys) == 0 && c.KeyFile == "" {
		add("isolation", "keys needs API keys to tell people apart: set --api-key-file")
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
// permissions; its errors name every bad line, one error per line.
func readKeyFile(path string) ([]auth.Key, []string, []error) {
	if path == "" {
		return nil, nil, []error{errors.New("is empty")}
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, nil, []error{fmt.Errorf("cannot read %s: %v", path, unwrapPathError(err))}
	}
	defer f.Close()
	var warnings []string
	if st, err := f.Stat(); err == nil {
		if st.IsDir() {
			return nil, nil, []error{fmt.Errorf("%s is a directory, not a key file", path)}
		}
		if w := permissionWarning(path, st.Mode().Perm()); w != "" {
			warnings = append(warnings, w)
		}
	}
	keys, err := auth.ParseKeyFile(f)
	if err != nil {
		var errs []error
		for _, line := range strings.Split(err.Error(), "\n") {
			errs = append(errs, fmt.Errorf("%s: %s", path, line))
		}
		return nil, warnings, errs
	}
	if len(keys) == 0 {
		return nil, warnings, []error{fmt.Errorf("%s holds no key (one key per line; # starts a comment)", path)}
	}
	return keys, warnings, nil
}

// permissionWarning says what is wrong with a key file's mode, or "".
//
// It warns when users other than the owner and the file's group can read or
// write the file, or when the group can write it. Group read access alone
// is deliberate: a Kubernetes Secret volume with fsGroup and defaultMode
// 0440, or chown root:comfygate with chmod 640, is how a service account
// that does not own the file is let in, and cannot be "fixed" with chmod.
//
// Windows has no such mode bits (Go reports every file as 0666 or 0444);
// who may read the file is up to its ACL there.
func permissionWarning(path string, perm os.FileMode) string {
	if runtime.GOOS == "windows" {
		return ""
	}
	switch {
	case perm&0o004 != 0:
		return fmt.Sprintf("key file %s can be read by every user of this machine (mode %04o); run chmod 600 %s (or 640 to share it with the file's group)", path, perm, path)
	case perm&0o002 != 0:
		return fmt.Sprintf("key file %s can be changed by every user of this machine (mode %04o); run chmod 600 %s (or 640 to share it with the file's group)", path, perm, path)
	case perm&0o020 != 0:
		return fmt.Sprintf("key file %s can be changed by its group (mode %04o); run chmod 600 %s (or 640 to let the group read it)", path, perm, path)
	}
	return ""
}

// authOffWarning says plainly that no key is configured and who can
// therefore use ComfyUI.
func authOffWarning(c *Config) string {
	for _, h := range c.Listen {
		if !isLoopback(h) {
			return fmt.Sprintf("authentication is OFF: listening on %s without an API key, so anyone who can reach this port can use ComfyUI; set --api-key-file", h)
		}
	}
	return fmt.Sprintf("authentication is OFF: no API key is configured, so anyone who can reach %s (every user and program on this machine) can use ComfyUI; set --api-key-file",
		strings.Join(c.Addrs(), ", "))
}

// sharesAddress returns the --listen host that metrics (host:port) would
// collide with on port, or "". An unspecified host (0.0.0.0, ::, empty)
// takes the port on every address, so it collides with any host; localhost
// is its loopback addresses.
func sharesAddress(metrics string, listen []string, port int) string {
	mh, mp, err := net.SplitHostPort(metrics)
	if err != nil {
		return ""
	}
	if p, err := strconv.Atoi(mp); err != nil || p != port {
		return ""
	}
	for _, h := range listen {
		if anyAddr(mh) || anyAddr(h) || sameHost(mh, h) {
			return h
		}
	}
	return ""
}

func anyAddr(h string) bool {
	ip := net.ParseIP(h)
	return h == "" || ip != nil && ip.IsUnspecified()
}

func sameHost(a, b string) bool {
	if strings.EqualFold(a, b) {
		return true
	}
	ipA, ipB := net.ParseIP(a), net.ParseIP(b)
	switch {
	case ipA != nil && ipB != nil:
		return ipA.Equal(ipB)
	case strings.EqualFold(a, "localhost"):
		return ipB != nil && ipB.IsLoopback()
	case strings.EqualFold(b, "localhost"):
		return ipA != nil && ipA.IsLoopback()
	}
	return false
}

// loopbackOr returns h if it is a loopback address, else 127.0.0.1, for an
// example of a free metrics address.
func loopbackOr(h string) string {
	if isLoopback(h) {
		return h
	}
	return "127.0.0.1"
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

// Fleet reports whether comfygate routes over several ComfyUI servers
// (more than one upstream, or an upstreams file).
func (c *Config) Fleet() bool { return len(c.Upstreams) > 1 || c.UpstreamsFile != "" }

// AuthEnabled reports whether any key is configured.
func (c *Config) AuthEnabled() bool { return len(c.Keys) > 0 }

// TLS reports whether comfygate serves HTTPS.
func (c *Config) TLS() bool { return c.TLSCertFile != "" }
