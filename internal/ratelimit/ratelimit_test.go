package ratelimit

import (
	"context"
	"net/netip"
	"strconv"
	"testing"
	"testing/synctest"
	"time"
)

// allow and fail drop the context and the error, which the memory
// versions never return, for the tests of the memory versions' timing.
func allow(l Limiter, key string) (bool, time.Duration) {
	ok, wait, err := l.Allow(context.Background(), key)
	if err != nil {
		panic(err)
	}
	return ok, wait
}

func fail(l Lockout, a netip.Addr) bool {
	locked, err := l.Fail(context.Background(), a)
	if err != nil {
		panic(err)
	}
	return locked
}

func isLocked(l Lockout, a netip.Addr) (time.Duration, bool) {
	left, locked, err := l.Locked(context.Background(), a)
	if err != nil {
		panic(err)
	}
	return left, locked
}

func TestAllow(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		l := New(5.0/60, 5) // 5 a minute
		for i := range 5 {
			if ok, _ := allow(l, "a"); !ok {
				t.Fatalf("attempt %d refused", i)
			}
		}
		ok, wait := allow(l, "a")
		if ok || wait != 12*time.Second {
			t.Errorf("sixth: %v, wait %v; want refused, 12s", ok, wait)
		}
		if ok, _ := allow(l, "b"); !ok {
			t.Error("another key shares the bucket")
		}
		time.Sleep(12 * time.Second)
		if ok, _ := allow(l, "a"); !ok {
			t.Error("no token back after 12s")
		}
		if New(0, 5) != nil || NewLockout(0, time.Minute) != nil {
			t.Error("a disabled limit is not nil")
		}
	})
}

// TestBounded: a limiter keyed by client address cannot grow past its cap.
func TestBounded(t *testing.T) {
	l := New(1, 1).(*memoryLimiter)
	for i := range maxEntries + 5000 {
		allow(l, strconv.Itoa(i))
	}
	if n := l.buckets.len(); n > maxEntries {
		t.Errorf("%d buckets; cap %d", n, maxEntries)
	}
}

func TestLockoutCounts(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		l := NewLockout(3, time.Minute)
		a := netip.MustParseAddr("198.51.100.1")
		if first, second := fail(l, a), fail(l, a); first || second {
			t.Fatal("locked before the threshold")
		}
		time.Sleep(61 * time.Second) // the first two fall out of the window
		if first, second := fail(l, a), fail(l, a); first || second {
			t.Fatal("old failures still counted")
		}
		if !fail(l, a) {
			t.Fatal("third failure within the window did not lock")
		}
		if left, locked := isLocked(l, a); !locked || left != time.Minute {
			t.Errorf("Locked = %v, %v", left, locked)
		}
		// IPv6 is counted per /64.
		v6 := NewLockout(2, time.Minute)
		fail(v6, netip.MustParseAddr("2001:db8::1"))
		fail(v6, netip.MustParseAddr("2001:db8::ffff"))
		if _, locked := isLocked(v6, netip.MustParseAddr("2001:db8::42")); !locked {
			t.Error("rotating addresses within a /64 escaped the lockout")
		}
		if _, locked := isLocked(v6, netip.MustParseAddr("2001:db8:1::1")); locked {
			t.Error("another /64 is locked too")
		}
		time.Sleep(time.Minute)
		if _, locked := isLocked(l, a); locked {
			t.Error("still locked after the window")
		}
	})
}

// TestLockoutBounded: an address-spraying client cannot grow the table
// past its cap.
func TestLockoutBounded(t *testing.T) {
	l := NewLockout(10, time.Hour).(*memoryLockout)
	for i := range maxEntries + 5000 {
		fail(l, netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}))
	}
	if n := l.clients.len(); n > maxEntries {
		t.Errorf("%d addresses tracked; cap %d", n, maxEntries)
	}
}

// TestTableForgetsIdleFirst: a full table forgets what changes nothing
// (here, the even keys) before anything else, and at most once a second.
func TestTableForgetsIdleFirst(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		tb := newTable[int](10, func(v int, _ time.Time) bool { return v%2 == 0 })
		for i := range 10 {
			tb.getOrAdd(i, time.Now(), func() int { return i })
		}
		tb.getOrAdd(10, time.Now(), func() int { return 11 })
		if tb.len() != 6 {
			t.Fatalf("%d entries after the sweep; want 5 odd ones and the new one", tb.len())
		}
		for i := 1; i < 10; i += 2 {
			if _, ok := tb.get(i); !ok {
				t.Errorf("busy entry %d forgotten", i)
			}
		}
		// Full again within the second: no sweep, arbitrary entries go.
		for i := 20; tb.len() < 10; i++ {
			tb.getOrAdd(i, time.Now(), func() int { return 1 })
		}
		tb.getOrAdd(99, time.Now(), func() int { return 1 })
		if n := tb.len(); n > 9 || n < 8 {
			t.Errorf("%d entries; want down to 90%% of 10, plus the new one", n)
		}
	})
}
