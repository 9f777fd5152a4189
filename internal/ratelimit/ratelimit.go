// Package ratelimit limits how fast each API key may make requests and queue
// prompts, with one token bucket per key name.
package ratelimit

import (
	"math"
	"net/http"
	"sync"
	"time"

	"github.com/comfygate/comfygate/internal/jsonerr"
	"github.com/comfygate/comfygate/internal/requestlog"
	"github.com/comfygate/comfygate/internal/route"
)

// Limiter holds one token bucket per key. A nil *Limiter allows everything.
type Limiter struct {
	rate  float64 // tokens per second
	burst float64

	mu        sync.Mutex
	buckets   map[string]*bucket
	lastSweep time.Time
}

type bucket struct {
	tokens float64
	last   time.Time
}

// New returns a limiter that allows perSecond events per second with bursts
// of burst; perSecond <= 0 returns nil (no limit).
func New(perSecond, burst float64) *Limiter {
	if perSecond <= 0 {
		return nil
	}
	if burst < 1 {
		burst = 1
	}
	return &Limiter{rate: perSecond, burst: burst, buckets: make(map[string]*bucket)}
}

// maxBuckets bounds the memory of a limiter keyed by client address.
const maxBuckets = 100_000

// makeRoom keeps the map under maxBuckets: a sweep at most once a second,
// then, if still full, arbitrary buckets forgotten down to 90% (a forgotten
// bucket starts full again, which errs towards allowing). l.mu must be held.
func (l *Limiter) makeRoom(now time.Time) {
	if now.Sub(l.lastSweep) >= time.Second {
		l.lastSweep = now
		l.sweep(now)
	}
	for k := range l.buckets {
		if len(l.buckets) < maxBuckets*9/10 {
			break
		}
		delete(l.buckets, k)
	}
}

// sweep drops buckets that have refilled completely: forgetting them
// changes nothing. l.mu must be held.
func (l *Limiter) sweep(now time.Time) {
	for k, b := range l.buckets {
		if b.tokens+now.Sub(b.last).Seconds()*l.rate >= l.burst {
			delete(l.buckets, k)
		}
	}
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
	b := l.buckets[key]
	if b == nil {
		if len(l.buckets) >= maxBuckets {
			l.makeRoom(now)
		}
		b = &bucket{tokens: l.burst, last: now}
		l.buckets[key] = b
	}
	b.tokens = math.Min(l.burst, b.tokens+now.Sub(b.last).Seconds()*l.rate)
	b.last = now
	if b.tokens >= 1 {
		b.tokens--
		return true, 0
	}
	wait := time.Duration((1 - b.tokens) / l.rate * float64(time.Second))
	return false, wait
}

// Middleware applies per-key limits to authenticated requests: requests
// counts every request, prompts only prompt submissions (POST /prompt and
// /api/prompt). Either may be nil. Requests without a key name (no keys
// configured) and public requests (public reports which: the UI's static
// files must not use up a key's budget) are not limited.
func Middleware(requests, prompts *Limiter, public func(*http.Request) bool) func(http.Handler) http.Handler {
	return func(next http.Handler) http.Handler {
		if requests == nil && prompts == nil {
			return next
		}
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			scope := requestlog.ScopeFrom(r.Context())
			name := scope.KeyName
			if name == "" || (public != nil && public(r)) {
				next.ServeHTTP(w, r)
				return
			}
			if ok, wait := requests.Allow(name); !ok {
				scope.AuthFailure = "rate_limited"
				refuse(w, wait, "this API key is over its request rate limit")
				return
			}
			if r.Method == http.MethodPost {
				if _, kind := route.Of(r.URL.Path); kind == "prompt" {
					if ok, wait := prompts.Allow(name); !ok {
						scope.AuthFailure = "rate_limited"
						refuse(w, wait, "this API key is over its prompt rate limit")
						return
					}
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
