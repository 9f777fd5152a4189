package session

import (
	"context"
	"testing"
	"time"

	"github.com/comfygate/comfygate/internal/redistest"
)

// BenchmarkGet is the cost of looking up a browser session, which every
// request with a session cookie pays, in memory and in a Redis on
// loopback: go test -bench Get -run ^$ ./internal/session
func BenchmarkGet(b *testing.B) {
	srv := redistest.Start(b)
	for _, bc := range []struct {
		name  string
		store Store
	}{
		{"memory", NewMemory(time.Hour)},
		{"redis", NewRedis(srv.Client(b), "bench:", time.Hour)},
	} {
		b.Run(bc.name, func(b *testing.B) {
			ctx := context.Background()
			id, err := bc.store.Create(ctx, [32]byte{1}, "bench")
			if err != nil {
				b.Fatal(err)
			}
			for b.Loop() {
				if _, ok, err := bc.store.Get(ctx, id); err != nil || !ok {
					b.Fatal(ok, err)
				}
			}
		})
	}
}
