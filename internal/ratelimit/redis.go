package ratelimit

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"math"
	"net/netip"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/comfygate/comfygate/internal/clientip"
)

// Both Redis versions decide in one Lua script, so that replicas counting
// the same key or address at the same moment never lose an update (no
// read-modify-write across round trips), and they read the time from
// Redis (TIME), so that replicas whose clocks disagree still share one
// window. Times in Redis are Unix microseconds; every key expires once it
// no longer changes a decision.

// gcraScript is the token bucket as GCRA (the generic cell rate
// algorithm): a key's state is one number, its "theoretical arrival time"
// (TAT). The bucket is full when TAT <= now; each event pushes TAT one
// interval on; an event is refused when that would put TAT more than
// burst intervals ahead of now. It decides exactly as x/time/rate's
// Limiter.Allow, and a refusal takes nothing.
//
// KEYS[1] the key's TAT; ARGV[1] the interval (µs per event); ARGV[2] the
// burst. Returns {1, 0} or {0, µs until one event is allowed}.
var gcraScript = redis.NewScript(`
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local horizon = interval * tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new = tat + interval
if new - now > horizon then
  return {0, new - now - horizon}
end
redis.call('SET', KEYS[1], string.format('%.0f', new), 'PX', math.ceil((new - now) / 1000))
return {1, 0}
`)

// redisLimiter is a Limiter in Redis.
type redisLimiter struct {
	rdb      redis.UniversalClient
	prefix   string
	interval int64 // µs per event
	burst    int
}

// NewRedis returns a limiter in Redis with New's budget, shared by every
// replica that uses the same Redis, prefix and name. Its keys are
// prefix + "rate:" + name + ":" + key. perSecond <= 0 returns nil.
func NewRedis(rdb redis.UniversalClient, prefix, name string, perSecond, burst float64) Limiter {
	if perSecond <= 0 {
		return nil
	}
	return &redisLimiter{
		rdb:      rdb,
		prefix:   prefix + "rate:" + name + ":",
		interval: max(int64(math.Round(1e6/perSecond)), 1),
		burst:    max(int(burst), 1),
	}
}

func (l *redisLimiter) Allow(ctx context.Context, key string) (bool, time.Duration, error) {
	res, err := gcraScript.Run(ctx, l.rdb, []string{l.prefix + key}, l.interval, l.burst).Int64Slice()
	if err != nil {
		return false, 0, fmt.Errorf("rate limit store: %w", err)
	}
	if len(res) != 2 {
		return false, 0, fmt.Errorf("rate limit store: unexpected answer %v", res)
	}
	return res[0] == 1, time.Duration(res[1]) * time.Microsecond, nil
}

// failScript records one failure in a sliding window and locks the
// address out when the window holds threshold of them, as the memory
// Lockout does: the failures are a sorted set (score: time), trimmed to
// the window and to the newest threshold entries; the lockout is a key
// that expires with it.
//
// KEYS[1] the failures, KEYS[2] the lock; ARGV[1] the window (µs),
// ARGV[2] the threshold, ARGV[3] a unique member. Returns 1 when this
// failure locked the address out.
var failScript = redis.NewScript(`
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local window = tonumber(ARGV[1])
local threshold = tonumber(ARGV[2])
local ms = math.ceil(window / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('(%.0f', now - window))
redis.call('ZADD', KEYS[1], string.format('%.0f', now), ARGV[3])
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -threshold - 1)
redis.call('PEXPIRE', KEYS[1], ms)
if redis.call('ZCARD', KEYS[1]) >= threshold and redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('SET', KEYS[2], '1', 'PX', ms)
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
`)

// redisLockout is a Lockout in Redis.
type redisLockout struct {
	rdb       redis.UniversalClient
	prefix    string
	threshold int
	window    time.Duration
}

// NewRedisLockout returns a Lockout in Redis with NewLockout's rules,
// shared by every replica that uses the same Redis and prefix. Its keys
// are prefix + "lockout:ADDRESS/BITS:fails" and ":locked". threshold 0
// disables it (nil).
func NewRedisLockout(rdb redis.UniversalClient, prefix string, threshold int, window time.Duration) Lockout {
	if threshold <= 0 || window <= 0 {
		return nil
	}
	return &redisLockout{rdb: rdb, prefix: prefix + "lockout:", threshold: threshold, window: window}
}

func (l *redisLockout) Window() time.Duration { return l.window }

func (l *redisLockout) keys(a netip.Addr) (fails, locked string) {
	k := l.prefix + clientip.Block(a).String() + ":"
	return k + "fails", k + "locked"
}

func (l *redisLockout) Locked(ctx context.Context, a netip.Addr) (time.Duration, bool, error) {
	if !a.IsValid() {
		return 0, false, nil
	}
	_, locked := l.keys(a)
	left, err := l.rdb.PTTL(ctx, locked).Result()
	if err != nil {
		return 0, false, fmt.Errorf("lockout store: %w", err)
	}
	if left <= 0 { // -2: no such key (-1, no expiry, is never written)
		return 0, false, nil
	}
	return left, true, nil
}

func (l *redisLockout) Fail(ctx context.Context, a netip.Addr) (bool, error) {
	if !a.IsValid() {
		return false, nil
	}
	fails, locked := l.keys(a)
	var member [12]byte
	rand.Read(member[:])
	n, err := failScript.Run(ctx, l.rdb, []string{fails, locked},
		l.window.Microseconds(), l.threshold, hex.EncodeToString(member[:])).Int()
	if err != nil {
		return false, fmt.Errorf("lockout store: %w", err)
	}
	return n == 1, nil
}

var (
	_ Limiter = (*redisLimiter)(nil)
	_ Lockout = (*redisLockout)(nil)
)
