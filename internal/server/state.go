package server

import (
	"context"
	"log/slog"
	"net/http"
	"os"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/comfygate/comfygate/internal/config"
	"github.com/comfygate/comfygate/internal/fleet"
	"github.com/comfygate/comfygate/internal/health"
	"github.com/comfygate/comfygate/internal/hub"
	"github.com/comfygate/comfygate/internal/ratelimit"
	"github.com/comfygate/comfygate/internal/redisstate"
	"github.com/comfygate/comfygate/internal/session"
)

// state makes the stores of what gateway replicas share: browser sessions,
// the lockout and the per-key limits, and in fleet mode the prompt records,
// the lease of the replica that acts on them and the sockets' relay. Without --redis they are in memory,
// as they always were; with it, in Redis.
//
// When Redis cannot be reached, the lockout and the limits let requests
// through (the key file alone decides), sessions fail closed (503), and
// /health/ready says so.
type state struct {
	rdb *redis.Client // nil without --redis
	// redis is the readiness check of rdb, cached for a second, for the
	// probe, /health and the metrics.
	redis *health.Dependency
	// name names this replica in /health: its host name (a pod's name).
	name string
}

func newState(cfg *config.Config, s *Server) state {
	if cfg.Redis == nil {
		return state{}
	}
	st := state{rdb: redisstate.Open(cfg.Redis, s.log)}
	st.redis = &health.Dependency{
		Name:  "Redis (--redis)",
		Check: func(ctx context.Context) error { return redisstate.Check(ctx, st.rdb, time.Second) },
	}
	st.name, _ = os.Hostname()
	s.log.Info("browser sessions, the lockout, the per-key limits and the fleet's prompt records and sockets are shared in Redis", "redis", cfg.Redis)
	// Connect now, so that a Redis that is down is in the log from the
	// start (the client's breaker logs it); the gateway starts anyway and
	// uses Redis once it answers.
	redisstate.Check(context.Background(), st.rdb, time.Second)
	return st
}

func (st state) lockout(threshold int, window time.Duration) ratelimit.Lockout {
	if st.rdb == nil {
		return ratelimit.NewLockout(threshold, window)
	}
	return ratelimit.NewRedisLockout(st.rdb, redisstate.Prefix, threshold, window)
}

// limiter returns a per-key limiter; name keeps limiters apart in Redis.
func (st state) limiter(name string, perSecond, burst float64) ratelimit.Limiter {
	if st.rdb == nil {
		return ratelimit.New(perSecond, burst)
	}
	return ratelimit.NewRedis(st.rdb, redisstate.Prefix, name, perSecond, burst)
}

func (st state) sessions(ttl time.Duration) session.Store {
	if st.rdb == nil {
		return session.NewMemory(ttl)
	}
	return session.NewRedis(st.rdb, redisstate.Prefix, ttl)
}

// fleetStore keeps the fleet's prompt records: nil (the fleet's memory
// store) without --redis.
func (st state) fleetStore() fleet.Store {
	if st.rdb == nil {
		return nil
	}
	return fleet.NewRedisStore(st.rdb, redisstate.Prefix, 0)
}

// leases elect the replica that acts on the fleet's records: nil (this
// gateway alone acts) without --redis.
func (st state) leases() fleet.Leases {
	if st.rdb == nil {
		return nil
	}
	return fleet.NewRedisLeases(st.rdb, redisstate.Prefix)
}

// relay carries socket messages between replicas: nil without --redis.
func (st state) relay(logger *slog.Logger) hub.Relay {
	if st.rdb == nil {
		return nil
	}
	return hub.NewRedisRelay(st.rdb, redisstate.Prefix, logger)
}

// ready adds Redis to the readiness probe when it is used.
func (st state) ready(h http.Handler) http.Handler {
	if st.rdb == nil {
		return h
	}
	return health.ReadyWith(h, st.redis)
}

// replica describes this replica for /health: nil without --redis.
// acting reports whether it holds the fleet's lease (nil: no fleet).
func (st state) replica(acting func() bool) func(context.Context) *health.Replica {
	if st.rdb == nil {
		return nil
	}
	return func(ctx context.Context) *health.Replica {
		rep := &health.Replica{ID: st.name, Redis: "ok", Acting: acting != nil && acting()}
		if err := st.redis.Err(ctx); err != nil {
			rep.Redis = err.Error()
		}
		return rep
	}
}

// redisUp reports whether Redis answered its last check, for the metrics.
func (st state) redisUp() bool {
	return st.redis.Err(context.Background()) == nil
}

func (st state) close() {
	if st.rdb != nil {
		st.rdb.Close()
	}
}
