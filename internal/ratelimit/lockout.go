package ratelimit

import (
	"context"
	"net/netip"
	"sync"
	"time"

	"github.com/comfygate/comfygate/internal/clientip"
)

// Lockout refuses clients that keep failing authentication: after threshold
// failures within window from one address, that address is locked out for
// window, whatever it sends. IPv6 clients are counted by /64
// (clientip.Block), since one host usually holds a whole /64. A nil Lockout
// is no lockout; constructors return nil when it is off, so callers test
// for nil before calling.
//
// An error means the shared store could not be asked; the caller decides
// (comfygate then lets the request through: see auth.Options.Lockout).
type Lockout interface {
	// Locked reports whether a is locked out, and for how long still.
	Locked(ctx context.Context, a netip.Addr) (left time.Duration, locked bool, err error)
	// Fail records a failed attempt from a and reports whether it has just
	// locked a out.
	Fail(ctx context.Context, a netip.Addr) (locked bool, err error)
	// Window is how long failures are counted and a lockout lasts.
	Window() time.Duration
}

// memoryLockout keeps failures in memory.
type memoryLockout struct {
	threshold int
	window    time.Duration

	mu      sync.Mutex
	clients *table[netip.Prefix, *failures]
}

type failures struct {
	times []time.Time // failures within the window, oldest first
	until time.Time   // locked until then
}

// NewLockout returns a Lockout in memory; threshold 0 disables it (nil).
func NewLockout(threshold int, window time.Duration) Lockout {
	if threshold <= 0 || window <= 0 {
		return nil
	}
	return &memoryLockout{threshold: threshold, window: window,
		clients: newTable[netip.Prefix](maxEntries, func(f *failures, now time.Time) bool {
			// Not locked, and every failure out of the window.
			return now.After(f.until) && (len(f.times) == 0 || f.times[len(f.times)-1].Before(now.Add(-window)))
		})}
}

func (l *memoryLockout) Window() time.Duration { return l.window }

func (l *memoryLockout) Locked(_ context.Context, a netip.Addr) (time.Duration, bool, error) {
	if !a.IsValid() {
		return 0, false, nil
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	f, ok := l.clients.get(clientip.Block(a))
	if !ok {
		return 0, false, nil
	}
	if left := time.Until(f.until); left > 0 {
		return left, true, nil
	}
	return 0, false, nil
}

func (l *memoryLockout) Fail(_ context.Context, a netip.Addr) (bool, error) {
	if !a.IsValid() {
		return false, nil
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
		return true, nil
	}
	return false, nil
}

func prune(ts []time.Time, since time.Time) []time.Time {
	i := 0
	for i < len(ts) && ts[i].Before(since) {
		i++
	}
	return append(ts[:0], ts[i:]...)
}

var _ Lockout = (*memoryLockout)(nil)
