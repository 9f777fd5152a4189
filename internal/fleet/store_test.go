package fleet

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"

	"github.com/comfygate/comfygate/internal/redistest"
)

// The Store and Leases contracts, run against the memory versions and the
// Redis versions on a real redis-server.

func TestMemoryStoreContract(t *testing.T) {
	testStoreContract(t, func(t *testing.T, maxDone int) Store { return NewMemoryStore(maxDone) })
}

func TestRedisStoreContract(t *testing.T) {
	srv := redistest.Start(t)
	rdb := srv.Client(t)
	testStoreContract(t, func(t *testing.T, maxDone int) Store {
		return NewRedisStore(rdb, "test:"+t.Name()+":", maxDone)
	})
}

func TestMemoryLeasesContract(t *testing.T) {
	testLeasesContract(t, func(t *testing.T) Leases { return NewMemoryLeases() })
}

func TestRedisLeasesContract(t *testing.T) {
	srv := redistest.Start(t)
	rdb := srv.Client(t)
	testLeasesContract(t, func(t *testing.T) Leases { return NewRedisLeases(rdb, "test:"+t.Name()+":") })
}

// equalPrompts compares records: times by Equal (a stored time loses its
// monotonic reading and maybe its zone), nil and empty slices alike.
var equalPrompts = cmp.Options{cmpopts.EquateEmpty()}

func ids(ps []Prompt) []string {
	var out []string
	for _, p := range ps {
		out = append(out, p.ID)
	}
	sort.Strings(out)
	return out
}

func testStoreContract(t *testing.T, newStore func(t *testing.T, maxDone int) Store) {
	t0 := time.Date(2026, 12, 1, 10, 0, 0, 123456789, time.UTC)
	full := Prompt{
		ID: "p1", Server: "gpu1", ServerID: "s1", ClientID: "c1", Owner: "alice",
		Body: []byte(`{"prompt":{"1":{"class_type":"X"}},"prompt_id":"p1"}`), Models: []string{"a.safetensors", "b.pt"},
		Created: t0, Placed: t0.Add(time.Second), Moves: 1,
		Stale: []Placement{{"gpu0", "s0"}},
	}

	t.Run("PutGet", func(t *testing.T) {
		ctx := t.Context()
		s := newStore(t, 0)
		if _, ok, err := s.Get(ctx, "p1"); ok || err != nil {
			t.Fatalf("Get of nothing = %v, %v", ok, err)
		}
		if err := s.Put(ctx, full); err != nil {
			t.Fatal(err)
		}
		got, ok, err := s.Get(ctx, "p1")
		if !ok || err != nil {
			t.Fatalf("Get = %v, %v", ok, err)
		}
		if diff := cmp.Diff(full, got, equalPrompts); diff != "" {
			t.Errorf("(-want +got)\n%s", diff)
		}
		// A copy: changing it changes nothing stored.
		got.Body[0], got.Models[0], got.Stale[0].Server = 'X', "changed", "changed"
		again, _, _ := s.Get(ctx, "p1")
		if diff := cmp.Diff(full, again, equalPrompts); diff != "" {
			t.Errorf("the store changed with a returned copy (-want +got)\n%s", diff)
		}
		// Put replaces.
		moved := full
		moved.Server, moved.ServerID, moved.Moves = "gpu2", "s2", 2
		moved.Stale = append([]Placement{{"gpu1", "s1"}}, full.Stale...)
		if err := s.Put(ctx, moved); err != nil {
			t.Fatal(err)
		}
		if got, _, _ := s.Get(ctx, "p1"); got.Server != "gpu2" || got.Moves != 2 {
			t.Errorf("after a second Put: %+v", got)
		}
	})

	t.Run("ByServerID", func(t *testing.T) {
		ctx := t.Context()
		s := newStore(t, 0)
		s.Put(ctx, full)
		for _, pl := range []Placement{{"gpu1", "s1"}, {"gpu0", "s0"}} {
			p, ok, err := s.ByServerID(ctx, pl.Server, pl.ServerID)
			if !ok || err != nil || p.ID != "p1" {
				t.Errorf("ByServerID(%v) = %q, %v, %v", pl, p.ID, ok, err)
			}
		}
		for _, pl := range []Placement{{"gpu1", "s0"}, {"gpu2", "s1"}, {"gpu", "1s1"}, {"", "gpu1s1"}} {
			if p, ok, err := s.ByServerID(ctx, pl.Server, pl.ServerID); ok || err != nil {
				t.Errorf("ByServerID(%v) = %q, %v, %v; want none", pl, p.ID, ok, err)
			}
		}
	})

	t.Run("ActiveOwnedFinished", func(t *testing.T) {
		ctx := t.Context()
		s := newStore(t, 0)
		put := func(id, server, owner string, done bool, finished time.Time) {
			t.Helper()
			p := Prompt{ID: id, Server: server, ServerID: "sid-" + id, Owner: owner, Done: done, Finished: finished}
			if !done {
				p.Body = []byte("{}")
			}
			if err := s.Put(ctx, p); err != nil {
				t.Fatal(err)
			}
		}
		put("a", "gpu1", "alice", false, time.Time{})
		put("b", "gpu1", "bob", false, time.Time{})
		put("c", "gpu1", "alice", true, t0)
		put("d", "gpu1", "alice", true, t0.Add(time.Minute))
		put("e", "gpu2", "bob", true, t0.Add(2*time.Minute))
		put("f", "gpu1", "", true, time.Time{}) // deleted: done, never seen finished
		put("g", "gpu1", "bob", true, t0.Add(time.Microsecond/2))
		active, err := s.Active(ctx)
		if diff := cmp.Diff([]string{"a", "b"}, ids(active)); diff != "" || err != nil {
			t.Errorf("Active (-want +got) %v\n%s", err, diff)
		}
		// b finishes: no longer active.
		put("b", "gpu1", "bob", true, t0.Add(3*time.Minute))
		if active, _ := s.Active(ctx); len(active) != 1 || active[0].ID != "a" || active[0].Body == nil {
			t.Errorf("Active after b finished = %+v", active)
		}
		own, err := s.Owned(ctx, "alice")
		if diff := cmp.Diff([]string{"a", "c", "d"}, ids(own)); diff != "" || err != nil {
			t.Errorf("Owned(alice) (-want +got) %v\n%s", err, diff)
		}
		if own, _ := s.Owned(ctx, ""); len(own) != 1 || own[0].ID != "f" {
			t.Errorf("Owned(\"\") = %v", ids(own))
		}
		if own, _ := s.Owned(ctx, "carol"); len(own) != 0 {
			t.Errorf("Owned(carol) = %v", ids(own))
		}
		fin, err := s.FinishedSince(ctx, "gpu1", t0.Add(time.Microsecond/2))
		// At or after since, to the nanosecond; not c (before), not e
		// (another server), not f (never seen finished).
		if diff := cmp.Diff([]string{"b", "d", "g"}, ids(fin)); diff != "" || err != nil {
			t.Errorf("FinishedSince (-want +got) %v\n%s", err, diff)
		}
		if fin, _ := s.FinishedSince(ctx, "gpu1", t0.Add(time.Hour)); len(fin) != 0 {
			t.Errorf("FinishedSince the future = %v", ids(fin))
		}
	})

	t.Run("ForgetsOldestDone", func(t *testing.T) {
		ctx := t.Context()
		s := newStore(t, 2)
		s.Put(ctx, Prompt{ID: "live", Server: "gpu1", ServerID: "x", Owner: "o"})
		for i, id := range []string{"d1", "d2", "d3"} {
			p := Prompt{ID: id, Server: "gpu1", ServerID: "s-" + id, Owner: "o", Done: true, Finished: t0.Add(time.Duration(i) * time.Second),
				Stale: []Placement{{"gpu0", "old-" + id}}}
			if err := s.Put(ctx, p); err != nil {
				t.Fatal(err)
			}
			// Putting a done record again does not count it twice.
			if err := s.Put(ctx, p); err != nil {
				t.Fatal(err)
			}
		}
		if _, ok, _ := s.Get(ctx, "d1"); ok {
			t.Error("the oldest done record is still there")
		}
		for _, pl := range []Placement{{"gpu1", "s-d1"}, {"gpu0", "old-d1"}} {
			if _, ok, _ := s.ByServerID(ctx, pl.Server, pl.ServerID); ok {
				t.Errorf("placement %v of a forgotten record still found", pl)
			}
		}
		for _, id := range []string{"live", "d2", "d3"} {
			if _, ok, _ := s.Get(ctx, id); !ok {
				t.Errorf("%s was forgotten", id)
			}
		}
		if own, _ := s.Owned(ctx, "o"); len(own) != 3 {
			t.Errorf("Owned = %v; want live, d2, d3", ids(own))
		}
		if fin, _ := s.FinishedSince(ctx, "gpu1", t0); len(fin) != 2 {
			t.Errorf("FinishedSince = %v; want d2, d3", ids(fin))
		}
	})

	t.Run("Files", func(t *testing.T) {
		ctx := t.Context()
		s := newStore(t, 0)
		f := File{Server: "gpu1", Type: "output", Subfolder: "sub", Filename: "a.png"}
		if _, ok, err := s.FileOwner(ctx, f); ok || err != nil {
			t.Fatalf("FileOwner of nothing = %v, %v", ok, err)
		}
		s.PutFile(ctx, f, "alice")
		upload := File{Type: "input", Filename: "a.png"}
		s.PutFile(ctx, upload, "bob")
		if o, ok, err := s.FileOwner(ctx, f); o != "alice" || !ok || err != nil {
			t.Errorf("FileOwner = %q, %v, %v", o, ok, err)
		}
		if o, ok, _ := s.FileOwner(ctx, upload); o != "bob" || !ok {
			t.Errorf("FileOwner(upload) = %q, %v", o, ok)
		}
		// Names that run into each other are still different files.
		for _, other := range []File{
			{Server: "gpu1", Type: "output", Subfolder: "", Filename: "sub/a.png"},
			{Server: "gpu1", Type: "outputsub", Filename: "a.png"},
			{Server: "gpu", Type: "1output", Subfolder: "sub", Filename: "a.png"},
		} {
			if o, ok, _ := s.FileOwner(ctx, other); ok {
				t.Errorf("FileOwner(%+v) = %q; want none", other, o)
			}
		}
		s.PutFile(ctx, f, "carol")
		if o, _, _ := s.FileOwner(ctx, f); o != "carol" {
			t.Errorf("after a second PutFile: %q", o)
		}
	})

	t.Run("Concurrent", func(t *testing.T) {
		ctx := t.Context()
		s := newStore(t, 0)
		var wg sync.WaitGroup
		for w := range 8 {
			wg.Go(func() {
				for i := range 20 {
					id := fmt.Sprintf("w%d-%d", w, i)
					if err := s.Put(ctx, Prompt{ID: id, Server: "gpu1", ServerID: id, Owner: "o", Done: i%2 == 1, Finished: t0}); err != nil {
						t.Error(err)
					}
				}
			})
		}
		wg.Wait()
		active, _ := s.Active(ctx)
		own, _ := s.Owned(ctx, "o")
		fin, _ := s.FinishedSince(ctx, "gpu1", t0)
		if len(active) != 80 || len(own) != 160 || len(fin) != 80 {
			t.Errorf("%d active, %d owned, %d finished; want 80, 160, 80", len(active), len(own), len(fin))
		}
	})
}

func testLeasesContract(t *testing.T, newLeases func(t *testing.T) Leases) {
	t.Run("Exclusive", func(t *testing.T) {
		ctx := t.Context()
		ls := newLeases(t)
		a, ok, err := ls.Acquire(ctx, "resubmit:p1", time.Hour)
		if !ok || err != nil {
			t.Fatalf("first Acquire = %v, %v", ok, err)
		}
		if _, ok, err := ls.Acquire(ctx, "resubmit:p1", time.Hour); ok || err != nil {
			t.Errorf("second Acquire = %v, %v; want refused", ok, err)
		}
		if _, ok, _ := ls.Acquire(ctx, "resubmit:p2", time.Hour); !ok {
			t.Error("another name is taken too")
		}
		if ok, err := a.Renew(ctx, time.Hour); !ok || err != nil {
			t.Errorf("Renew = %v, %v", ok, err)
		}
		if err := a.Release(ctx); err != nil {
			t.Fatal(err)
		}
		b, ok, _ := ls.Acquire(ctx, "resubmit:p1", time.Hour)
		if !ok {
			t.Fatal("not free after Release")
		}
		// The old holder can neither renew nor release its successor's.
		if ok, _ := a.Renew(ctx, time.Hour); ok {
			t.Error("a released lease renewed")
		}
		a.Release(ctx)
		if _, ok, _ := ls.Acquire(ctx, "resubmit:p1", time.Hour); ok {
			t.Error("the old holder's Release ended the new holder's lease")
		}
		b.Release(ctx)
	})

	t.Run("Expires", func(t *testing.T) {
		ctx := t.Context()
		ls := newLeases(t)
		a, ok, _ := ls.Acquire(ctx, "steal:gpu1", 50*time.Millisecond)
		if !ok {
			t.Fatal("Acquire refused")
		}
		// Free again once its time ran out; no bound on when we look.
		var b Lease
		redistest.Eventually(t, func(ctx context.Context) error {
			l, ok, err := ls.Acquire(ctx, "steal:gpu1", time.Hour)
			if err == nil && !ok {
				err = errors.New("still held")
			}
			b = l
			return err
		})
		if ok, _ := a.Renew(ctx, time.Hour); ok {
			t.Error("an expired lease renewed over its successor")
		}
		a.Release(ctx)
		if ok, err := b.Renew(ctx, time.Hour); !ok || err != nil {
			t.Errorf("the successor lost its lease: %v, %v", ok, err)
		}
	})

	t.Run("ConcurrentExactlyOne", func(t *testing.T) {
		ls := newLeases(t)
		var (
			mu  sync.Mutex
			won int
			wg  sync.WaitGroup
		)
		for range 16 {
			wg.Go(func() {
				_, ok, err := ls.Acquire(t.Context(), "resubmit:p9", time.Hour)
				if err != nil {
					t.Error(err)
				}
				if ok {
					mu.Lock()
					won++
					mu.Unlock()
				}
			})
		}
		wg.Wait()
		if won != 1 {
			t.Errorf("%d holders; want exactly 1", won)
		}
	})
}

// TestRedisStoreShared: two clients (two replicas) see one set of records.
func TestRedisStoreShared(t *testing.T) {
	srv := redistest.Start(t)
	ctx := t.Context()
	a, b := NewRedisStore(srv.Client(t), "cg:", 0), NewRedisStore(srv.Client(t), "cg:", 0)
	if err := a.Put(ctx, Prompt{ID: "p1", Server: "gpu1", ServerID: "s1", ClientID: "c1", Owner: "alice", Body: []byte("{}")}); err != nil {
		t.Fatal(err)
	}
	a.PutFile(ctx, File{Server: "gpu1", Type: "output", Filename: "x.png"}, "alice")
	if p, ok, _ := b.ByServerID(ctx, "gpu1", "s1"); !ok || p.ClientID != "c1" {
		t.Errorf("the other replica does not see the prompt: %+v, %v", p, ok)
	}
	if o, ok, _ := b.FileOwner(ctx, File{Server: "gpu1", Type: "output", Filename: "x.png"}); !ok || o != "alice" {
		t.Errorf("the other replica does not see the file: %q, %v", o, ok)
	}
}

// TestRedisStoreForgetsOldestFiles: the file index is bounded as in memory.
func TestRedisStoreForgetsOldestFiles(t *testing.T) {
	srv := redistest.Start(t)
	ctx := t.Context()
	s := NewRedisStore(srv.Client(t), "cg:", 0).(*redisStore)
	s.maxFiles = 3
	for i := range 5 {
		s.PutFile(ctx, File{Type: "input", Filename: fmt.Sprint(i)}, "o")
	}
	for i := range 5 {
		_, ok, err := s.FileOwner(ctx, File{Type: "input", Filename: fmt.Sprint(i)})
		if err != nil || ok != (i >= 2) {
			t.Errorf("file %d: known %v, %v", i, ok, err)
		}
	}
}

// TestRedisStoreOutage: with Redis stuck or down, calls return errors
// rather than hang, and the same store works again when Redis is back.
func TestRedisStoreOutage(t *testing.T) {
	srv := redistest.Start(t)
	rdb := srv.Client(t)
	s := NewRedisStore(rdb, "cg:", 0)
	ls := NewRedisLeases(rdb, "cg:")
	n := 0
	redistest.Outage(t, srv, func(ctx context.Context) error {
		n++
		id := fmt.Sprint("p", n)
		if err := s.Put(ctx, Prompt{ID: id, Server: "gpu1", ServerID: id}); err != nil {
			return err
		}
		if _, err := s.Active(ctx); err != nil {
			return err
		}
		l, ok, err := ls.Acquire(ctx, id, time.Minute)
		if err != nil {
			return err
		}
		if !ok {
			return errors.New("lease refused")
		}
		return l.Release(ctx)
	})
}
