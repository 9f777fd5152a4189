package redisstate_test

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"strings"
	"testing"

	"github.com/redis/go-redis/v9"

	"github.com/comfygate/comfygate/internal/redisstate"
	"github.com/comfygate/comfygate/internal/redistest"
)

func TestURLHidesPassword(t *testing.T) {
	u, err := redisstate.ParseURL("rediss://user:s3cret@redis.example:6380/3?read_timeout=2s")
	if err != nil {
		t.Fatal(err)
	}
	var logs bytes.Buffer
	slog.New(slog.NewJSONHandler(&logs, nil)).Info("x", "redis", u)
	for _, s := range []string{u.String(), logs.String()} {
		if strings.Contains(s, "s3cret") || !strings.Contains(s, "redis.example:6380") {
			t.Errorf("%q shows the password or not the host", s)
		}
	}
	o := u.Options()
	if o.Password != "s3cret" || o.Username != "user" || o.DB != 3 || o.TLSConfig == nil || o.TLSConfig.ServerName != "redis.example" {
		t.Errorf("options %+v", o)
	}
	if o.ReadTimeout.String() != "2s" || o.DialTimeout != redisstate.DefaultDialTimeout || o.MaxRetries != 1 {
		t.Errorf("timeouts: read %v, dial %v, retries %d", o.ReadTimeout, o.DialTimeout, o.MaxRetries)
	}
	if !u.HasPassword() || u.Addr() != "redis.example:6380" {
		t.Errorf("HasPassword %v, Addr %q", u.HasPassword(), u.Addr())
	}
}

// TestBreaker: a call that times out makes the next ones fail at once
// (ErrUnavailable) instead of each waiting out the timeout; answers from
// Redis, error replies included, never do; and it closes by itself.
func TestBreaker(t *testing.T) {
	srv := redistest.Start(t)
	c := srv.Client(t)
	ctx := t.Context()

	// An error reply is an answer: Redis is up.
	c.Set(ctx, "s", "not a number", 0)
	if err := c.Incr(ctx, "s").Err(); err == nil {
		t.Fatal("INCR of a string succeeded")
	}
	if err := c.Get(ctx, "missing").Err(); !errors.Is(err, redis.Nil) {
		t.Fatalf("GET missing: %v", err)
	}
	if err := c.Ping(ctx).Err(); err != nil {
		t.Fatalf("after error replies: %v; want the breaker closed", err)
	}

	srv.Pause()
	if err := redistest.Within(t, func(ctx context.Context) error { return c.Ping(ctx).Err() }); err == nil {
		t.Fatal("a call to a stuck Redis succeeded")
	}
	err := c.Ping(ctx).Err()
	if !errors.Is(err, redisstate.ErrUnavailable) {
		t.Errorf("next call: %v; want ErrUnavailable at once", err)
	}
	if got := redisstate.Describe(err); got != "Redis did not answer in time" {
		t.Errorf("Describe = %q; want the reason the breaker opened", got)
	}
	srv.Resume()
	redistest.Eventually(t, func(ctx context.Context) error { return c.Ping(ctx).Err() })
}

func TestDescribe(t *testing.T) {
	for _, tt := range []struct {
		err  error
		want string
	}{
		{nil, "ok"},
		{redisstate.ErrUnavailable, "Redis is unavailable"},
		{context.DeadlineExceeded, "did not answer in time"},
		{errors.New("dial tcp 10.0.0.1:6379: connect: connection refused"), "refused the connection"},
		{errors.New("dial tcp: lookup redis on 10.0.0.2:53: no such host"), "cannot be reached"},
	} {
		got := redisstate.Describe(tt.err)
		if !strings.Contains(got, tt.want) || strings.Contains(got, "10.0.0") {
			t.Errorf("Describe(%v) = %q; want %q, no address", tt.err, got, tt.want)
		}
	}
}
