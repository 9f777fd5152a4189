// Package ratelimit refuses clients and keys that do too much: per-key
// request and prompt limits (Limiter, a token bucket per key) and the
// brute-force lockout per client address (Lockout).
//
// Each has two implementations behind one interface: in memory (New,
// NewLockout; golang.org/x/time/rate buckets in tables of bounded size),
// the default, and in Redis (NewRedis, NewRedisLockout), shared by every
// gateway replica, each decision one atomic Lua script on Redis's clock.
package ratelimit

import (
	"context"
	"net/http"
	"sync"
	"time"

	"golang.org/x/time/rate"

	"github.com/comfygate/comfygate/internal/jsonerr"
	"github.com/comfygate/comfygate/internal/reqscope"
	"github.com/comfygate/comfygate/internal/route"
)

// Limiter hands each key a budget: rate events per second, in bursts of up
// to burst. A nil Limiter is no limit; constructors return nil for "no
// limit", so callers test for nil before calling.
type Limiter interface {
	// Allow takes one event from key's budget. When the budget is spent it
	// takes nothing and reports how long until one event is back. An
	// error means the budget could not be checked (a shared store that is
	// down); the caller decides whether to allow.
	Allow(ctx context.Context, key string) (ok bool, retryAfter time.Duration, err error)
}

// memoryLimiter holds one token bucket per key, in memory.
type memoryLimiter struct {
	limit rate.Limit
	burst int

	mu      sync.Mutex
	buckets *table[string, *rate.Limiter]
}

// New returns a limiter in memory that allows perSecond events per second
// with bursts of burst (at least 1; a fraction is rounded down);
// perSecond <= 0 returns nil (no limit).
func New(perSecond, burst float64) Limiter {
	if perSecond <= 0 {
		return nil
	}
	l := &memoryLimiter{limit: rate.Limit(perSecond), burst: max(int(burst), 1)}
	// A full bucket is the same as none: forgetting it changes nothing.
	l.buckets = newTable[string](maxEntries, func(b *rate.Limiter, now time.Time) bool {
		return b.TokensAt(now) >= float64(l.burst)
	})
	return l
}

// Allow takes one token from key's bucket. When the bucket is empty it
// reports how long until a token is back.
func (l *memoryLimiter) Allow(_ context.Context, key string) (bool, time.Duration, error) {
	now := time.Now()
	l.mu.Lock()
	defer l.mu.Unlock()
	b := l.buckets.getOrAdd(key, now, func() *rate.Limiter { return rate.NewLimiter(l.limit, l.burst) })
	if b.AllowN(now, 1) {
		return true, 0, nil
	}
	// A refusal takes nothing, so the wait is until one whole token.
	return false, time.Duration((1 - b.TokensAt(now)) / float64(l.limit) * float64(time.Second)), nil
}

// Middleware applies per-key limits to authenticated requests: requests
// counts every request, prompts only prompt submissions (POST /prompt and
// /api/prompt). Either may be nil. Requests without a key name (no keys
// configured) and public requests (the UI's static files must not use up a
// key's budget) are not limited; it reads both, and the route, from the
// request's scope.
//
// A limiter that cannot be asked (Redis down) allows: limits protect the
// servers' capacity, and an outage of the shared store must not become an
// outage of the gateway for every key holder.
func Middleware(requests, prompts Limiter) func(http.Handler) http.Handler {
	return func(next http.Handler) http.Handler {
		if requests == nil && prompts == nil {
			return next
		}
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			scope := reqscope.From(r.Context())
			name := scope.KeyName
			if name == "" || scope.Route.Access != route.Protected {
				next.ServeHTTP(w, r)
				return
			}
			if requests != nil {
				if ok, wait, err := requests.Allow(r.Context(), name); !ok && err == nil {
					scope.AuthFailure = "rate_limited"
					refuse(w, wait, "this API key is over its request rate limit")
					return
				}
			}
			if prompts != nil && r.Method == http.MethodPost && scope.Route.Kind == "prompt" {
				if ok, wait, err := prompts.Allow(r.Context(), name); !ok && err == nil {
					scope.AuthFailure = "rate_limited"
					refuse(w, wait, "this API key is over its prompt rate limit")
					return
				}
			}
			next.ServeHTTP(w, r)
		})
	}
}

func refuse(w http.ResponseWriter, wait time.Duration, msg string) {
	jsonerr.SetRetryAfter(w.Header(), wait)
	jsonerr.Write(w, http.StatusTooManyRequests, "rate_limited", msg)
}

var _ Limiter = (*memoryLimiter)(nil)
