// Package redisstate connects comfygate to the Redis that several gateway
// replicas share (--redis): it parses and checks the URL, opens a client
// whose every call is bounded in time, and stops calling a Redis that does
// not answer for a moment, so that a Redis outage slows no request that does
// not need it.
//
// The stores themselves (sessions, lockout and limits, the fleet's prompt
// records) live next to their memory versions, in their own packages.
package redisstate

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/redis/go-redis/v9/maintnotifications"
)

// Prefix starts every key comfygate writes. Two deployments that must not
// share state use two databases (redis://host/1, redis://host/2).
const Prefix = "comfygate:"

// ErrUnavailable is returned without calling Redis while it is considered
// down: for a short while after a call timed out or could not connect.
// The error returned is ErrUnavailable with the reason (errors.Is).
var ErrUnavailable = errors.New("redis is unavailable")

// unavailableError is ErrUnavailable with the last failure's reason.
type unavailableError struct{ reason string }

func (e *unavailableError) Error() string        { return ErrUnavailable.Error() + ": " + e.reason }
func (e *unavailableError) Is(target error) bool { return target == ErrUnavailable }

// Bounds of every call, unless the URL sets its own (dial_timeout=,
// read_timeout=, write_timeout=, pool_timeout=, max_retries=). Redis answers
// in well under a millisecond; these only bound how long a request waits
// for a Redis that is down or stuck.
const (
	DefaultDialTimeout = time.Second
	DefaultReadTimeout = 500 * time.Millisecond
	DefaultPoolTimeout = time.Second
	// Cooldown is how long calls fail at once (ErrUnavailable) after one
	// timed out or could not connect; then the next call tries again.
	Cooldown = time.Second
)

// URL is a checked --redis URL: redis:// or rediss:// (TLS), with an
// optional user and password and a database number. Its String and
// LogValue hide the password.
type URL struct {
	u    *url.URL
	opts *redis.Options
}

// ParseURL checks s. Its errors never quote the password.
func ParseURL(s string) (*URL, error) {
	u, err := url.Parse(strings.TrimSpace(s))
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err // url.Error quotes the whole URL, password included
		}
		return nil, fmt.Errorf("not a URL (%v); want redis://[:password@]host[:port][/db] or rediss://… for TLS", err)
	}
	if u.Scheme != "redis" && u.Scheme != "rediss" {
		return nil, fmt.Errorf("scheme must be redis or rediss (TLS), got %q (example: redis://:password@redis:6379/0)", u.Scheme)
	}
	if u.Hostname() == "" {
		return nil, errors.New("no host (example: redis://:password@redis:6379/0)")
	}
	if u.Fragment != "" {
		return nil, errors.New("a fragment (#…) is not allowed")
	}
	opts, err := redis.ParseURL(u.String())
	if err != nil {
		return nil, errors.New(strings.TrimPrefix(err.Error(), "redis: "))
	}
	if opts.DB < 0 {
		return nil, fmt.Errorf("database number must not be negative, got %d", opts.DB)
	}
	return &URL{u: u, opts: opts}, nil
}

// String returns the URL with its password replaced by "xxxxx".
func (u *URL) String() string { return u.u.Redacted() }

// LogValue logs the URL without its password.
func (u *URL) LogValue() slog.Value { return slog.StringValue(u.String()) }

// Addr is the server's host:port.
func (u *URL) Addr() string { return u.opts.Addr }

// DB is the database number.
func (u *URL) DB() int { return u.opts.DB }

// HasPassword reports whether the URL carries a password.
func (u *URL) HasPassword() bool {
	if u.u.User == nil {
		return false
	}
	_, ok := u.u.User.Password()
	return ok
}

// TLS reports whether the URL is rediss://.
func (u *URL) TLS() bool { return u.opts.TLSConfig != nil }

// Options returns the client options the URL gives, with comfygate's
// bounds filled in where the URL sets none.
func (u *URL) Options() *redis.Options {
	o := *u.opts
	if u.opts.TLSConfig != nil {
		o.TLSConfig = u.opts.TLSConfig.Clone()
	}
	if o.DialTimeout == 0 {
		o.DialTimeout = DefaultDialTimeout
	}
	if o.ReadTimeout == 0 {
		o.ReadTimeout = DefaultReadTimeout
	}
	if o.WriteTimeout == 0 {
		o.WriteTimeout = o.ReadTimeout
	}
	if o.PoolTimeout == 0 {
		o.PoolTimeout = DefaultPoolTimeout
	}
	if o.MaxRetries == 0 {
		// One retry: a pooled connection that died with a restarted Redis
		// is replaced at once, and a dead Redis costs one more attempt,
		// not three.
		o.MaxRetries = 1
	}
	// One dial per attempt (the default is five, 100 ms apart).
	o.DialerRetries = 1
	// A cancelled request must not wait for Redis.
	o.ContextTimeoutEnabled = true
	// Hosted-Redis maintenance push notifications: not needed, and one
	// command less per connection.
	o.MaintNotificationsConfig = &maintnotifications.Config{Mode: maintnotifications.ModeDisabled}
	return &o
}

// Open returns a client for u whose calls fail fast (ErrUnavailable) for
// Cooldown after one timed out or could not connect. It does not connect:
// a Redis that is down at start-up is reported by Check and by the calls
// that need it, and is used as soon as it is up. logger gets one line when
// Redis stops answering and one when it is back.
func Open(u *URL, logger *slog.Logger) *redis.Client {
	if logger != nil {
		// The library's own lines (each failed dial…) are details of what
		// the breaker reports once.
		redis.SetLogger(libLogger{logger})
	}
	o := u.Options()
	o.Limiter = newBreaker(u.String(), Cooldown, logger)
	return redis.NewClient(o)
}

// Check pings Redis through c, within timeout, and says what is wrong in
// words safe to show a client (no address, no password).
func Check(ctx context.Context, c redis.UniversalClient, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	err := c.Ping(ctx).Err()
	if err == nil {
		return nil
	}
	return errors.New(Describe(err))
}

// Describe says in a few words, without addresses or secrets, why a call to
// Redis failed.
func Describe(err error) string {
	var (
		rerr  redis.Error
		unavl *unavailableError
	)
	switch {
	case err == nil:
		return "ok"
	case errors.As(err, &unavl):
		return unavl.reason
	case errors.Is(err, ErrUnavailable):
		return "Redis is unavailable"
	case errors.Is(err, context.DeadlineExceeded), isTimeout(err):
		return "Redis did not answer in time"
	case redis.IsAuthError(err):
		return "Redis refused the credentials (check the password in --redis)"
	case redis.IsLoadingError(err):
		return "Redis is loading its data"
	case errors.As(err, &rerr):
		msg := rerr.Error()
		if i := strings.IndexByte(msg, ' '); i > 0 {
			msg = msg[:i] // the error code only: NOPERM, READONLY, OOM…
		}
		return "Redis answered with an error: " + msg
	case strings.Contains(err.Error(), "refused"):
		return "Redis refused the connection (is it running?)"
	}
	return "Redis cannot be reached"
}

func isTimeout(err error) bool {
	var t interface{ Timeout() bool }
	return errors.As(err, &t) && t.Timeout()
}

// breaker is the client's go-redis Limiter: after a call that timed out or
// could not reach Redis, it fails every call at once for cooldown, so that
// requests do not each wait out a timeout while Redis is down or stuck.
// Answers from Redis, errors or not, are not failures.
type breaker struct {
	name     string
	cooldown time.Duration
	log      *slog.Logger

	mu        sync.Mutex
	openUntil time.Time
	reason    string // why it opened
	down      bool   // logged as down, not yet back
	downSince time.Time
}

func newBreaker(name string, cooldown time.Duration, logger *slog.Logger) *breaker {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	return &breaker{name: name, cooldown: cooldown, log: logger}
}

// Allow refuses calls while the breaker is open.
func (b *breaker) Allow() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if time.Now().Before(b.openUntil) {
		return &unavailableError{reason: b.reason}
	}
	return nil
}

// ReportResult opens the breaker on a failure to reach Redis and notes that
// Redis is back on anything else.
func (b *breaker) ReportResult(err error) {
	var rerr redis.Error
	failed, answered := unreachable(err), err == nil || errors.As(err, &rerr)
	if !failed && !answered {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	now := time.Now()
	if failed {
		b.openUntil, b.reason = now.Add(b.cooldown), Describe(err)
		if !b.down {
			b.down, b.downSince = true, now
			b.log.Warn("Redis is unreachable; browser sessions fail, and the lockout and per-key limits are not enforced until it is back",
				"redis", b.name, "reason", b.reason, "err", err)
		}
		return
	}
	if b.down {
		b.down = false
		b.log.Info("Redis is reachable again", "redis", b.name, "down_for", now.Sub(b.downSince).Round(time.Millisecond).String())
	}
}

// unreachable reports whether err means Redis could not be reached (a
// failed dial) or did not answer in time. An answer (redis.Nil, an error
// reply) is not, nor a caller that gave up, nor a pooled connection that
// broke (EOF, reset: Redis restarted), which the client retries at once
// on a new connection; if Redis is really gone, that dial fails.
func unreachable(err error) bool {
	var (
		rerr redis.Error
		op   *net.OpError
	)
	switch {
	case err == nil, errors.As(err, &rerr), errors.Is(err, context.Canceled):
		return false
	case isTimeout(err), errors.Is(err, context.DeadlineExceeded), errors.Is(err, redis.ErrPoolTimeout):
		return true
	case errors.As(err, &op) && op.Op == "dial":
		return true
	}
	return false
}

// libLogger sends go-redis's log lines to slog, at debug level.
type libLogger struct{ log *slog.Logger }

func (l libLogger) Printf(ctx context.Context, format string, v ...any) {
	l.log.DebugContext(ctx, "redis client: "+fmt.Sprintf(format, v...))
}

var _ redis.Limiter = (*breaker)(nil)
