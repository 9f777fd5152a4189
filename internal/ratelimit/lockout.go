package ratelimit

import (
	"net/netip"
	"sync"
	"time"

	"github.com/comfygate/comfygate/internal/clientip"
)

// Lockout refuses clients that keep failing authentication: after threshold
// failures within window from one address, that address is locked out for
// window, whatever it sends. IPv6 clients are counted by /64
// (clientip.Block), since one host usually holds a whole /64.
type Lockout struct {
	threshold int
	window    time.Duration

	mu      sync.Mutex
	clients *table[netip.Prefix, *failures]
}

type failures struct {
	times []time.Time // failures within the window, oldest first
	until time.Time   // locked until then
}

// NewLockout returns a Lockout; threshold 0 disables it (nil is also valid).
func NewLockout(threshold int, window time.Duration) *Lockout {
	if threshold <= 0 || window <= 0 {
		return nil
	}
	return &Lockout{threshold: threshold, window: window,
		clients: newTable[netip.Prefix](maxEntries, func(f *failures, now time.Time) bool {
			// Not locked, and every failure out of the window.
			return now.After(f.until) && (len(f.times) == 0 || f.times[len(f.times)-1].Before(now.Add(-window)))
		})}
}

// Window is how long failures are counted and a lockout lasts.
func (l *Lockout) Window() time.Duration {
	if l == nil {
		return 0
	}
	return l.window
}

// Locked reports whether a is locked out, and for how long still.
func (l *Lockout) Locked(a netip.Addr) (time.Duration, bool) {
	if l == nil || !a.IsValid() {
		return 0, false
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	f, ok := l.clients.get(clientip.Block(a))
	if !ok {
		return 0, false
	}
	if left := time.Until(f.until); left > 0 {
		return left, true
	}
	return 0, false
}

// Fail records a failed attempt from a and reports whether it has just
// locked a out.
func (l *Lockout) Fail(a netip.Addr) bool {
	if l == nil || !a.IsValid() {
		return false
	}
	now := time.Now()
	l.mu.Lock()
	defer l.mu.Unlock()
	f := l.clients.getOrAdd(clientip.Block(a), now, func() *failures { return &failures{} })
	f.times = prune(f.times, now.Add(-l.window))
	f.times = append(f.times, now)
	if len(f.times) >= l.threshold && now.After(f.until) {
		f.until = now.Add(l.window)
		f.times = f.times[:0]
		return true
	}
	return false
}

func prune(ts []time.Time, since time.Time) []time.Time {
	i := 0
	for i < len(ts) && ts[i].Before(since) {
		i++
	}
	return append(ts[:0], ts[i:]...)
}
