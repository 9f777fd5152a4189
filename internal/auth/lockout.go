package auth

import (
	"net/netip"
	"sync"
	"time"
)

// Lockout refuses clients that keep failing authentication: after Threshold
// failures within Window from one address, that address is locked out for
// Window, whatever it sends. IPv6 clients are counted by /64, since one
// host usually holds a whole /64.
type Lockout struct {
	threshold int
	window    time.Duration

	mu        sync.Mutex
	clients   map[netip.Addr]*failures
	lastSweep time.Time
}

type failures struct {
	times []time.Time // failures within the window, oldest first
	until time.Time   // locked until then
}

// maxTracked bounds the memory an address-spraying attacker can make the
// gateway spend; past it, expired entries are swept.
const maxTracked = 100_000

// NewLockout returns a Lockout; threshold 0 disables it (nil is also valid).
func NewLockout(threshold int, window time.Duration) *Lockout {
	if threshold <= 0 || window <= 0 {
		return nil
	}
	return &Lockout{threshold: threshold, window: window, clients: make(map[netip.Addr]*failures)}
}

func lockoutKey(a netip.Addr) netip.Addr {
	if a.Is6() && !a.Is4In6() {
		p, _ := a.Prefix(64)
		return p.Addr()
	}
	return a
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
	f := l.clients[lockoutKey(a)]
	if f == nil {
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
	k := lockoutKey(a)
	l.mu.Lock()
	defer l.mu.Unlock()
	f := l.clients[k]
	if f == nil {
		if len(l.clients) >= maxTracked {
			l.makeRoom(now)
		}
		f = &failures{}
		l.clients[k] = f
	}
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

// makeRoom keeps the map under maxTracked without an O(n) sweep on every
// new address: it sweeps expired entries at most once a second, and if the
// map is still full (an address-spraying attacker), forgets arbitrary
// entries down to 90%. l.mu must be held.
func (l *Lockout) makeRoom(now time.Time) {
	if now.Sub(l.lastSweep) >= time.Second {
		l.lastSweep = now
		l.sweep(now)
	}
	for k := range l.clients { // map order is random
		if len(l.clients) < maxTracked*9/10 {
			break
		}
		delete(l.clients, k)
	}
}

func (l *Lockout) sweep(now time.Time) {
	for k, f := range l.clients {
		if now.After(f.until) && (len(f.times) == 0 || f.times[len(f.times)-1].Before(now.Add(-l.window))) {
			delete(l.clients, k)
		}
	}
}
