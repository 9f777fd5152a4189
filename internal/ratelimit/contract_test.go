package ratelimit

import (
	"context"
	"errors"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/comfygate/comfygate/internal/redistest"
)

// stores makes limiters and lockouts of one kind, each fresh (nothing
// shared with another made for another test).
type stores struct {
	limiter func(t *testing.T, perSecond, burst float64) Limiter
	lockout func(t *testing.T, threshold int, window time.Duration) Lockout
}

func memoryStores() stores {
	return stores{
		limiter: func(_ *testing.T, perSecond, burst float64) Limiter { return New(perSecond, burst) },
		lockout: func(_ *testing.T, threshold int, window time.Duration) Lockout { return NewLockout(threshold, window) },
	}
}

func redisStores(rdb redis.UniversalClient) stores {
	return stores{
		limiter: func(t *testing.T, perSecond, burst float64) Limiter {
			return NewRedis(rdb, "test:"+t.Name()+":", "requests", perSecond, burst)
		},
		lockout: func(t *testing.T, threshold int, window time.Duration) Lockout {
			return NewRedisLockout(rdb, "test:"+t.Name()+":", threshold, window)
		},
	}
}

// TestMemoryContract and TestRedisContract run one contract against both.
func TestMemoryContract(t *testing.T) { testContract(t, memoryStores()) }

func TestRedisContract(t *testing.T) {
	srv := redistest.Start(t)
	testContract(t, redisStores(srv.Client(t)))
}

const hour = 1.0 / 3600 // one event an hour: no refill within a test

func testContract(t *testing.T, s stores) {
	t.Run("LimiterBurstAndWait", func(t *testing.T) {
		ctx := t.Context()
		l := s.limiter(t, 5.0/60, 5) // 5 a minute
		for i := range 5 {
			if ok, _, err := l.Allow(ctx, "a"); !ok || err != nil {
				t.Fatalf("event %d: %v, %v", i, ok, err)
			}
		}
		ok, wait, err := l.Allow(ctx, "a")
		// The wait is 12s less the time the test took so far.
		if ok || err != nil || wait <= 0 || wait > 12*time.Second {
			t.Errorf("sixth: %v, wait %v, %v; want refused, up to 12s", ok, wait, err)
		}
		if ok, _, _ := l.Allow(ctx, "b"); !ok {
			t.Error("another key shares the bucket")
		}
		if s.limiter(t, 0, 5) != nil {
			t.Error("a limiter without a rate is not nil")
		}
	})

	t.Run("LimiterRefills", func(t *testing.T) {
		l := s.limiter(t, 20, 1)
		if ok, _, err := l.Allow(t.Context(), "a"); !ok || err != nil {
			t.Fatalf("first: %v, %v", ok, err)
		}
		// A token comes back within 50ms; no bound on when we look.
		redistest.Eventually(t, func(ctx context.Context) error {
			ok, _, err := l.Allow(ctx, "a")
			if err == nil && !ok {
				err = errors.New("refused")
			}
			return err
		})
	})

	t.Run("LimiterConcurrentExact", func(t *testing.T) {
		// Parallel callers share one budget: exactly burst get through.
		l := s.limiter(t, hour, 50)
		var allowed atomic.Int64
		var wg sync.WaitGroup
		for range 8 {
			wg.Go(func() {
				for range 20 {
					ok, _, err := l.Allow(t.Context(), "k")
					if err != nil {
						t.Error(err)
					}
					if ok {
						allowed.Add(1)
					}
				}
			})
		}
		wg.Wait()
		if n := allowed.Load(); n != 50 {
			t.Errorf("%d of 160 allowed; want exactly 50", n)
		}
	})

	t.Run("LockoutCounts", func(t *testing.T) {
		ctx := t.Context()
		l := s.lockout(t, 3, time.Hour)
		if l.Window() != time.Hour {
			t.Errorf("Window = %v", l.Window())
		}
		a := netip.MustParseAddr("198.51.100.1")
		for i := range 2 {
			if locked, err := l.Fail(ctx, a); locked || err != nil {
				t.Fatalf("failure %d: %v, %v", i, locked, err)
			}
		}
		if _, locked, _ := l.Locked(ctx, a); locked {
			t.Fatal("locked before the threshold")
		}
		if locked, err := l.Fail(ctx, a); !locked || err != nil {
			t.Fatalf("third failure: %v, %v; want locked", locked, err)
		}
		left, locked, err := l.Locked(ctx, a)
		if !locked || err != nil || left <= 0 || left > time.Hour {
			t.Errorf("Locked = %v, %v, %v; want up to an hour", left, locked, err)
		}
		// Failing on while locked does not lock "again".
		if locked, _ := l.Fail(ctx, a); locked {
			t.Error("a failure while locked reported a new lockout")
		}
		if _, locked, _ := l.Locked(ctx, netip.MustParseAddr("198.51.100.2")); locked {
			t.Error("another address is locked too")
		}
		if _, locked, err := l.Locked(ctx, netip.Addr{}); locked || err != nil {
			t.Error("the zero address is locked")
		}
		// IPv6 is counted per /64.
		v6 := s.lockout(t, 2, time.Hour)
		v6.Fail(ctx, netip.MustParseAddr("2001:db8::1"))
		v6.Fail(ctx, netip.MustParseAddr("2001:db8::ffff"))
		if _, locked, _ := v6.Locked(ctx, netip.MustParseAddr("2001:db8::42")); !locked {
			t.Error("rotating addresses within a /64 escaped the lockout")
		}
		if _, locked, _ := v6.Locked(ctx, netip.MustParseAddr("2001:db8:1::1")); locked {
			t.Error("another /64 is locked too")
		}
		if s.lockout(t, 0, time.Hour) != nil {
			t.Error("a lockout with threshold 0 is not nil")
		}
	})

	t.Run("LockoutWindow", func(t *testing.T) {
		ctx := t.Context()
		const window = 200 * time.Millisecond
		l := s.lockout(t, 2, window)
		a := netip.MustParseAddr("192.0.2.7")
		l.Fail(ctx, a)
		time.Sleep(2 * window) // at least: the first failure is out of the window
		if locked, err := l.Fail(ctx, a); locked || err != nil {
			t.Fatalf("a failure out of the window still counted: %v, %v", locked, err)
		}
		one := s.lockout(t, 1, window)
		if locked, _ := one.Fail(ctx, a); !locked {
			t.Fatal("threshold 1 did not lock")
		}
		// The lockout ends by itself; no bound on when we look.
		redistest.Eventually(t, func(ctx context.Context) error {
			if _, locked, err := one.Locked(ctx, a); err != nil || locked {
				return errors.Join(err, errors.New("still locked"))
			}
			return nil
		})
	})

	t.Run("LockoutConcurrentExact", func(t *testing.T) {
		// 40 failures at once from one address: exactly one of them
		// reports the lockout.
		l := s.lockout(t, 10, time.Hour)
		a := netip.MustParseAddr("203.0.113.9")
		var lockouts atomic.Int64
		var wg sync.WaitGroup
		for range 8 {
			wg.Go(func() {
				for range 5 {
					locked, err := l.Fail(t.Context(), a)
					if err != nil {
						t.Error(err)
					}
					if locked {
						lockouts.Add(1)
					}
				}
			})
		}
		wg.Wait()
		if n := lockouts.Load(); n != 1 {
			t.Errorf("%d failures reported a lockout; want exactly 1", n)
		}
	})
}

// TestRedisSharedBetweenClients: two clients (two replicas) draw on one
// budget and one lockout.
func TestRedisSharedBetweenClients(t *testing.T) {
	srv := redistest.Start(t)
	ctx := t.Context()
	a, b := NewRedis(srv.Client(t), "cg:", "requests", hour, 2), NewRedis(srv.Client(t), "cg:", "requests", hour, 2)
	a.Allow(ctx, "k")
	b.Allow(ctx, "k")
	if ok, _, err := a.Allow(ctx, "k"); ok || err != nil {
		t.Errorf("third event across two replicas: %v, %v; want refused", ok, err)
	}
	// Another name is another budget.
	if ok, _, _ := NewRedis(srv.Client(t), "cg:", "prompts", hour, 2).Allow(ctx, "k"); !ok {
		t.Error("the prompt budget shares the request budget")
	}
	la, lb := NewRedisLockout(srv.Client(t), "cg:", 2, time.Hour), NewRedisLockout(srv.Client(t), "cg:", 2, time.Hour)
	ip := netip.MustParseAddr("198.51.100.1")
	la.Fail(ctx, ip)
	if locked, _ := lb.Fail(ctx, ip); !locked {
		t.Error("failures on two replicas did not add up")
	}
	if _, locked, _ := la.Locked(ctx, ip); !locked {
		t.Error("the other replica does not see the lockout")
	}
}

// TestRedisOutage: with Redis stuck or down, every call returns an error
// (which the middleware and auth treat as "allow"), never hangs, and the
// same limiter works again when Redis is back.
func TestRedisOutage(t *testing.T) {
	srv := redistest.Start(t)
	rdb := srv.Client(t)
	l := NewRedis(rdb, "cg:", "requests", 1000, 1000)
	lo := NewRedisLockout(rdb, "cg:", 1000, time.Hour)
	ip := netip.MustParseAddr("198.51.100.1")
	redistest.Outage(t, srv, func(ctx context.Context) error {
		if _, _, err := l.Allow(ctx, "k"); err != nil {
			return err
		}
		if _, err := lo.Fail(ctx, ip); err != nil {
			return err
		}
		_, _, err := lo.Locked(ctx, ip)
		return err
	})
}
