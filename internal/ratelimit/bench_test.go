package ratelimit

import (
	"context"
	"testing"

	"github.com/comfygate/comfygate/internal/redistest"
)

// BenchmarkAllow is the cost of the per-key limit, which every request
// with a key pays when --key-rate-limit is set, in memory and in a Redis
// on loopback: go test -bench Allow -run ^$ ./internal/ratelimit
func BenchmarkAllow(b *testing.B) {
	srv := redistest.Start(b)
	for _, bc := range []struct {
		name string
		l    Limiter
	}{
		{"memory", New(1e9, 1e9)},
		{"redis", NewRedis(srv.Client(b), "bench:", "requests", 1e9, 1e9)},
	} {
		b.Run(bc.name, func(b *testing.B) {
			ctx := context.Background()
			for b.Loop() {
				if ok, _, err := bc.l.Allow(ctx, "key"); err != nil || !ok {
					b.Fatal(ok, err)
				}
			}
		})
	}
}
