package fleet

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
)

// Leases hand out short exclusive leases by name, so that where only one
// gateway replica may act (queue a dead server's prompt again, move a
// waiting prompt), exactly one does: the one that got the lease on, say,
// "resubmit:<prompt id>". A lease ends when its holder releases it or, if
// the holder dies, when its time runs out; a holder that works longer
// renews it.
type Leases interface {
	// Acquire takes the lease on name for ttl. ok is false when another
	// holder has it.
	Acquire(ctx context.Context, name string, ttl time.Duration) (l Lease, ok bool, err error)
}

// Lease is one held lease.
type Lease interface {
	// Renew extends the lease to ttl from now. ok is false when it was
	// lost (ran out, and maybe taken by another holder): stop acting.
	Renew(ctx context.Context, ttl time.Duration) (ok bool, err error)
	// Release ends the lease if it is still this holder's.
	Release(ctx context.Context) error
}

// newToken returns a holder's random token: only the holder that set a
// lease can renew or release it.
func newToken() string {
	var b [16]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// NewMemoryLeases returns the Leases of a single gateway, in memory.
func NewMemoryLeases() Leases { return &memoryLeases{held: map[string]memoryHold{}} }

type memoryLeases struct {
	mu   sync.Mutex
	held map[string]memoryHold
}

type memoryHold struct {
	token string
	until time.Time
}

type memoryLease struct {
	ls          *memoryLeases
	name, token string
}

func (ls *memoryLeases) Acquire(_ context.Context, name string, ttl time.Duration) (Lease, bool, error) {
	now := time.Now()
	ls.mu.Lock()
	defer ls.mu.Unlock()
	if h, ok := ls.held[name]; ok && now.Before(h.until) {
		return nil, false, nil
	}
	// Expired holds of other names go when the map has grown.
	if len(ls.held) > 1024 {
		for n, h := range ls.held {
			if !now.Before(h.until) {
				delete(ls.held, n)
			}
		}
	}
	t := newToken()
	ls.held[name] = memoryHold{token: t, until: now.Add(ttl)}
	return &memoryLease{ls: ls, name: name, token: t}, true, nil
}

func (l *memoryLease) Renew(_ context.Context, ttl time.Duration) (bool, error) {
	now := time.Now()
	l.ls.mu.Lock()
	defer l.ls.mu.Unlock()
	h, ok := l.ls.held[l.name]
	if !ok || h.token != l.token || !now.Before(h.until) {
		return false, nil
	}
	l.ls.held[l.name] = memoryHold{token: l.token, until: now.Add(ttl)}
	return true, nil
}

func (l *memoryLease) Release(context.Context) error {
	l.ls.mu.Lock()
	defer l.ls.mu.Unlock()
	if h, ok := l.ls.held[l.name]; ok && h.token == l.token {
		delete(l.ls.held, l.name)
	}
	return nil
}

// NewRedisLeases returns Leases in Redis, shared by every replica that uses
// the same Redis and prefix (redisstate.Prefix): a lease is the key
// prefix + "lease:" + name, set with SET NX PX to the holder's token;
// renewing and releasing compare the token first, in one Lua script, so a
// holder whose lease ran out never extends or ends its successor's.
// Redis's clock times the leases, so replicas' clocks need not agree.
func NewRedisLeases(rdb redis.UniversalClient, prefix string) Leases {
	return &redisLeases{rdb: rdb, prefix: prefix + "lease:"}
}

type redisLeases struct {
	rdb    redis.UniversalClient
	prefix string
}

type redisLease struct {
	rdb        redis.UniversalClient
	key, token string
}

func (ls *redisLeases) Acquire(ctx context.Context, name string, ttl time.Duration) (Lease, bool, error) {
	t := newToken()
	key := ls.prefix + name
	err := ls.rdb.SetArgs(ctx, key, t, redis.SetArgs{Mode: "NX", TTL: ttl}).Err()
	if errors.Is(err, redis.Nil) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("lease %s: %w", name, err)
	}
	return &redisLease{rdb: ls.rdb, key: key, token: t}, true, nil
}

// renewScript: KEYS[1] the lease; ARGV[1] the token, ARGV[2] the TTL in ms.
var renewScript = redis.NewScript(`
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
`)

// releaseScript: KEYS[1] the lease; ARGV[1] the token.
var releaseScript = redis.NewScript(`
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
`)

func (l *redisLease) Renew(ctx context.Context, ttl time.Duration) (bool, error) {
	n, err := renewScript.Run(ctx, l.rdb, []string{l.key}, l.token, max(ttl.Milliseconds(), 1)).Int()
	if err != nil {
		return false, fmt.Errorf("lease: %w", err)
	}
	return n == 1, nil
}

func (l *redisLease) Release(ctx context.Context) error {
	if err := releaseScript.Run(ctx, l.rdb, []string{l.key}, l.token).Err(); err != nil {
		return fmt.Errorf("lease: %w", err)
	}
	return nil
}

var (
	_ Leases = (*memoryLeases)(nil)
	_ Leases = (*redisLeases)(nil)
)
