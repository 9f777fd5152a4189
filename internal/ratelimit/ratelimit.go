// Package ratelimit refuses clients and keys that do too much: per-key
// request and prompt limits (Limiter, one token bucket per key, from
// golang.org/x/time/rate) and the brute-force lockout per client address
// (Lockout). Both keep their state in memory, in tables of bounded size.
package ratelimit

import (
	"net/http"
	"sync"
	"time"

	"golang.org/x/time/rate"

	"github.com/comfygate/comfygate/internal/jsonerr"
	"github.com/comfygate/comfygate/internal/reqscope"
	"github.com/comfygate/comfygate/internal/route"
)

// Limiter holds one token bucket per key. A nil *Limiter allows everything.
type Limiter struct {
	limit rate.Limit
	burst int

	mu      sync.Mutex
	buckets *table[string, *rate.Limiter]
}

// New returns a limiter that allows perSecond events per second with bursts
// of burst (at least 1; a fraction is rounded down); perSecond <= 0 returns
// nil (no limit).
func New(perSecond, burst float64) *Limiter {
	if perSecond <= 0 {
		return nil
	}
	l := &Limiter{limit: rate.Limit(perSecond), burst: max(int(burst), 1)}
	// A full bucket is the same as none: forgetting it changes nothing.
	l.buckets = newTable[string](maxEntries, func(b *rate.Limiter, now time.Time) bool {
		return b.TokensAt(now) >= float64(l.burst)
	})
	return l
}

// Allow takes one token from key's bucket. When the bucket is empty it
// reports how long until a token is back.
func (l *Limiter) Allow(key string) (ok bool, retryAfter time.Duration) {
	if l == nil {
		return true, 0
	}
	now := time.Now()
	l.mu.Lock()
	defer l.mu.Unlock()
	b := l.buckets.getOrAdd(key, now, func() *rate.Limiter { return rate.NewLimiter(l.limit, l.burst) })
	if b.AllowN(now, 1) {
		return true, 0
	}
	// A refusal takes nothing, so the wait is until one whole token.
	return false, time.Duration((1 - b.TokensAt(now)) / float64(l.limit) * float64(time.Second))
}

// Middleware applies per-key limits to authenticated requests: requests
// counts every request, prompts only prompt submissions (POST /prompt and
// /api/prompt). Either may be nil. Requests without a key name (no keys
// configured) and public requests (the UI's static files must not use up a
// key's budget) are not limited; it reads both, and the route, from the
// request's scope.
func Middleware(requests, prompts *Limiter) func(http.Handler) http.Handler {
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
			if ok, wait := requests.Allow(name); !ok {
				scope.AuthFailure = "rate_limited"
				refuse(w, wait, "this API key is over its request rate limit")
				return
			}
			if r.Method == http.MethodPost && scope.Route.Kind == "prompt" {
				if ok, wait := prompts.Allow(name); !ok {
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
