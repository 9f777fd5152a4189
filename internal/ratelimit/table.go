package ratelimit

import "time"

// maxEntries bounds the memory of a table whose keys a client chooses (its
// address, within limits) or that grows with the key file.
const maxEntries = 100_000

// table maps keys to their state and never holds more than max entries, so
// an address-spraying client cannot make it grow without bound. It is not
// safe for concurrent use; its owner locks.
type table[K comparable, V any] struct {
	max int
	m   map[K]V
	// idle reports that forgetting v at now changes nothing (a full bucket,
	// failures that are all out of their window).
	idle      func(v V, now time.Time) bool
	lastSweep time.Time
}

func newTable[K comparable, V any](max int, idle func(V, time.Time) bool) *table[K, V] {
	return &table[K, V]{max: max, m: make(map[K]V), idle: idle}
}

// get returns k's state, if it has any.
func (t *table[K, V]) get(k K) (V, bool) {
	v, ok := t.m[k]
	return v, ok
}

// getOrAdd returns k's state, adding the one fresh makes when k has none.
func (t *table[K, V]) getOrAdd(k K, now time.Time, fresh func() V) V {
	if v, ok := t.m[k]; ok {
		return v
	}
	if len(t.m) >= t.max {
		t.makeRoom(now)
	}
	v := fresh()
	t.m[k] = v
	return v
}

// makeRoom keeps the table under max without an O(n) sweep for every new
// key: it forgets idle entries at most once a second, and if the table is
// still full (an address-spraying client), arbitrary entries down to 90%.
// A forgotten entry starts afresh, which errs towards allowing.
func (t *table[K, V]) makeRoom(now time.Time) {
	if now.Sub(t.lastSweep) >= time.Second {
		t.lastSweep = now
		for k, v := range t.m {
			if t.idle(v, now) {
				delete(t.m, k)
			}
		}
	}
	for k := range t.m { // map order is random
		if len(t.m) < t.max*9/10 {
			break
		}
		delete(t.m, k)
	}
}

func (t *table[K, V]) len() int { return len(t.m) }
