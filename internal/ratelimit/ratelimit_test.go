package ratelimit

import (
	"strconv"
	"testing"
	"testing/synctest"
	"time"
)

func TestAllow(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		l := New(5.0/60, 5) // 5 a minute
		for i := range 5 {
			if ok, _ := l.Allow("a"); !ok {
				t.Fatalf("attempt %d refused", i)
			}
		}
		ok, wait := l.Allow("a")
		if ok || wait != 12*time.Second {
			t.Errorf("sixth: %v, wait %v; want refused, 12s", ok, wait)
		}
		if ok, _ := l.Allow("b"); !ok {
			t.Error("another key shares the bucket")
		}
		time.Sleep(12 * time.Second)
		if ok, _ := l.Allow("a"); !ok {
			t.Error("no token back after 12s")
		}
		var none *Limiter
		if ok, _ := none.Allow("x"); !ok {
			t.Error("a nil limiter refused")
		}
	})
}

// TestBounded: a limiter keyed by client address cannot grow past its cap.
func TestBounded(t *testing.T) {
	l := New(1, 1)
	for i := range maxBuckets + 5000 {
		l.Allow(strconv.Itoa(i))
	}
	if n := len(l.buckets); n > maxBuckets {
		t.Errorf("%d buckets; cap %d", n, maxBuckets)
	}
}
