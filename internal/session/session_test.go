package session

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/comfygate/comfygate/internal/redistest"
)

// newStoreFunc makes an empty store whose sessions last ttl.
type newStoreFunc func(t *testing.T, ttl time.Duration) Store

// TestMemory and TestRedis run the same contract against both stores.
func TestMemory(t *testing.T) {
	testStore(t, func(t *testing.T, ttl time.Duration) Store { return NewMemory(ttl) })
}

func TestRedis(t *testing.T) {
	srv := redistest.Start(t)
	rdb := srv.Client(t)
	testStore(t, func(t *testing.T, ttl time.Duration) Store {
		// A prefix per test: one server serves every subtest.
		return NewRedis(rdb, "test:"+t.Name()+":", ttl)
	})
}

func testStore(t *testing.T, newStore newStoreFunc) {
	key := func(n byte) [32]byte { return sha256.Sum256([]byte{n}) }
	t.Run("CreateGetDelete", func(t *testing.T) {
		ctx := t.Context()
		s := newStore(t, time.Hour)
		if s.TTL() != time.Hour {
			t.Errorf("TTL = %v", s.TTL())
		}
		before := time.Now()
		id, err := s.Create(ctx, key(1), "alice")
		if err != nil {
			t.Fatal(err)
		}
		if len(id) < 40 || strings.ContainsAny(id, "+/=;, ") {
			t.Errorf("id %q is short or not cookie-safe", id)
		}
		sess, ok, err := s.Get(ctx, id)
		if err != nil || !ok {
			t.Fatalf("Get = %v, %v", ok, err)
		}
		if sess.KeyID != key(1) || sess.KeyName != "alice" {
			t.Errorf("session = %+v", sess)
		}
		// Stores may keep the expiry to the millisecond.
		if sess.Expires.Before(before.Add(time.Hour-time.Millisecond)) || sess.Expires.After(time.Now().Add(time.Hour)) {
			t.Errorf("expires %v; want an hour after %v", sess.Expires, before)
		}
		for _, bad := range []string{"", "nope", id + "x", strings.Repeat("a", 200)} {
			if _, ok, err := s.Get(ctx, bad); ok || err != nil {
				t.Errorf("Get(%.20q) = %v, %v", bad, ok, err)
			}
		}
		if err := s.Delete(ctx, id); err != nil {
			t.Fatal(err)
		}
		if _, ok, err := s.Get(ctx, id); ok || err != nil {
			t.Errorf("after Delete: %v, %v", ok, err)
		}
		// Deleting what is not there is no error.
		if err := s.Delete(ctx, id); err != nil {
			t.Error(err)
		}
		if err := s.Delete(ctx, ""); err != nil {
			t.Error(err)
		}
	})

	t.Run("DeleteKey", func(t *testing.T) {
		ctx := t.Context()
		s := newStore(t, time.Hour)
		var alice []string
		for range 3 {
			id, err := s.Create(ctx, key(1), "alice")
			if err != nil {
				t.Fatal(err)
			}
			alice = append(alice, id)
		}
		bob, err := s.Create(ctx, key(2), "bob")
		if err != nil {
			t.Fatal(err)
		}
		// One of alice's sessions ended by logout already: not counted.
		if err := s.Delete(ctx, alice[0]); err != nil {
			t.Fatal(err)
		}
		n, err := s.DeleteKey(ctx, key(1))
		if err != nil || n != 2 {
			t.Errorf("DeleteKey = %d, %v; want 2", n, err)
		}
		for _, id := range alice {
			if _, ok, _ := s.Get(ctx, id); ok {
				t.Error("a session of the deleted key survived")
			}
		}
		if _, ok, _ := s.Get(ctx, bob); !ok {
			t.Error("another key's session ended")
		}
		if n, err := s.DeleteKey(ctx, key(1)); n != 0 || err != nil {
			t.Errorf("second DeleteKey = %d, %v", n, err)
		}
		// The key may log in again.
		id, err := s.Create(ctx, key(1), "alice")
		if err != nil {
			t.Fatal(err)
		}
		if _, ok, _ := s.Get(ctx, id); !ok {
			t.Error("a new session after DeleteKey is not found")
		}
	})

	t.Run("Expiry", func(t *testing.T) {
		ctx := t.Context()
		s := newStore(t, 100*time.Millisecond)
		id, err := s.Create(ctx, key(1), "alice")
		if err != nil {
			t.Fatal(err)
		}
		// No bound on how late it ends, only that it does.
		redistest.Eventually(t, func(ctx context.Context) error {
			if _, ok, err := s.Get(ctx, id); err != nil || ok {
				return errors.New("still there")
			}
			return nil
		})
		if n, err := s.DeleteKey(ctx, key(1)); n != 0 || err != nil {
			t.Errorf("DeleteKey after expiry = %d, %v", n, err)
		}
	})

	t.Run("Concurrent", func(t *testing.T) {
		ctx := t.Context()
		s := newStore(t, time.Hour)
		const workers, each = 8, 25
		var (
			mu  sync.Mutex
			ids = map[string]bool{}
			wg  sync.WaitGroup
		)
		for w := range workers {
			wg.Go(func() {
				for range each {
					id, err := s.Create(ctx, key(byte(w%2)), "k")
					if err != nil {
						t.Error(err)
						return
					}
					if _, ok, err := s.Get(ctx, id); !ok || err != nil {
						t.Errorf("Get of a fresh session: %v, %v", ok, err)
					}
					mu.Lock()
					ids[id] = true
					mu.Unlock()
				}
			})
		}
		wg.Wait()
		if len(ids) != workers*each {
			t.Fatalf("%d distinct ids; want %d", len(ids), workers*each)
		}
		n0, err0 := s.DeleteKey(ctx, key(0))
		n1, err1 := s.DeleteKey(ctx, key(1))
		if err0 != nil || err1 != nil || n0 != workers/2*each || n1 != workers/2*each {
			t.Errorf("DeleteKey = %d, %d (%v, %v); want %d each", n0, n1, err0, err1, workers/2*each)
		}
	})
}

// TestRedisStoresOnlyHashes: what Redis holds is the SHA-256 of the session
// id, never the id, which is the cookie.
func TestRedisStoresOnlyHashes(t *testing.T) {
	srv := redistest.Start(t)
	rdb := srv.Client(t)
	ctx := t.Context()
	s := NewRedis(rdb, "cg:", time.Hour)
	id, err := s.Create(ctx, sha256.Sum256([]byte("k")), "alice")
	if err != nil {
		t.Fatal(err)
	}
	keys, err := rdb.Keys(ctx, "*").Result()
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.Sum256([]byte(id))
	want := "cg:session:" + hex.EncodeToString(h[:])
	found := false
	for _, k := range keys {
		v, _ := rdb.Dump(ctx, k).Result()
		if strings.Contains(k, id) || strings.Contains(v, id) {
			t.Errorf("key %s holds the raw session id", k)
		}
		found = found || k == want
	}
	if !found {
		t.Errorf("keys %v; want %s among them", keys, want)
	}
	if ttl := rdb.PTTL(ctx, want).Val(); ttl <= 0 || ttl > time.Hour {
		t.Errorf("session key TTL %v; want at most an hour", ttl)
	}
}

// TestRedisOutage: with Redis stuck or down, calls fail with an error (the
// caller must not take it for "no session") instead of hanging, and the
// same store works again when Redis is back.
func TestRedisOutage(t *testing.T) {
	srv := redistest.Start(t)
	s := NewRedis(srv.Client(t), "cg:", time.Hour)
	k := sha256.Sum256([]byte("k"))
	redistest.Outage(t, srv, func(ctx context.Context) error {
		id, err := s.Create(ctx, k, "alice")
		if err != nil {
			return err
		}
		if _, ok, err := s.Get(ctx, id); err != nil || !ok {
			return errors.Join(err, errors.New("fresh session not found"))
		}
		_, err = s.DeleteKey(ctx, k)
		return err
	})
	srv.Stop()
	if _, ok, err := s.Get(t.Context(), "some-id-of-43-characters-aaaaaaaaaaaaaaaaa"); err == nil || ok {
		t.Errorf("Get with Redis down = %v, %v; want an error", ok, err)
	}
}
