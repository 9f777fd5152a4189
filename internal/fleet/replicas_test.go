package fleet

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/comfygate/comfygate/internal/comfytest"
	"github.com/comfygate/comfygate/internal/hub"
	"github.com/comfygate/comfygate/internal/redistest"
)

// newReplica is one gateway replica over fakes, sharing state with the
// others through Redis: prompt records, the leader lease and the hub's
// relay. It polls every pollEvery until stop is called (without releasing
// its lease, as a replica killed with SIGKILL) or the test ends.
func newReplica(t *testing.T, rs *redistest.Server, fakes []*comfytest.Fake, pollEvery time.Duration) (tf *testFleet, stop func()) {
	t.Helper()
	rdb := rs.Client(t)
	tf = serveFleet(t, specsOf(fakes), fakes, Options{PollInterval: pollEvery, PollTimeout: 2 * time.Second,
		Store: NewRedisStore(rdb, "cgtest:", 0), Leases: NewRedisLeases(rdb, "cgtest:")},
		hub.NewRedisRelay(rdb, "cgtest:", slog.New(slog.DiscardHandler)))
	tf.Tick(context.Background())
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{}, 2)
	go func() { tf.opts.Hub.Run(ctx); done <- struct{}{} }()
	go func() {
		defer func() { done <- struct{}{} }()
		t := time.NewTicker(pollEvery)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				tf.Tick(ctx)
			}
		}
	}()
	stopped := false
	stop = func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		<-done
		<-done
		tf.opts.Hub.Close()
		tf.pool.CloseIdleConnections()
	}
	t.Cleanup(stop)
	return tf, stop
}

// TestReplicasActAsOne: two replicas over the same servers and Redis. A
// prompt queued through one streams to the client's socket on the other,
// with the client's ids, and its history and image are served by either.
func TestReplicasActAsOne(t *testing.T) {
	rs := redistest.Start(t)
	fakes := []*comfytest.Fake{comfytest.New(t, comfytest.Options{}), comfytest.New(t, comfytest.Options{})}
	a, _ := newReplica(t, rs, fakes, 100*time.Millisecond)
	b, _ := newReplica(t, rs, fakes, 100*time.Millisecond)

	ws := b.dialWS(t, "tester")
	var ids []string
	for i := range 4 {
		ids = append(ids, a.queue(t, workflow(fmt.Sprint("rep", i))))
	}
	// Prompts on two servers interleave: read until every one ended.
	executed, ended := map[string]bool{}, map[string]bool{}
	timeout := time.After(10 * time.Second)
	for len(ended) < len(ids) {
		select {
		case m, ok := <-ws:
			if !ok {
				t.Fatal("socket closed")
			}
			id, _ := m.data["prompt_id"].(string)
			if m.typ == "executed" {
				executed[id] = true
			}
			if m.typ == "executing" && m.data["node"] == nil {
				ended[id] = true
			}
		case <-timeout:
			t.Fatalf("the socket on replica b saw %d of %d prompts end", len(ended), len(ids))
		}
	}
	for _, id := range ids {
		if !executed[id] || !ended[id] {
			t.Errorf("the socket on replica b: executed %v, ended %v for %s (queued through a)", executed[id], ended[id], id)
		}
		h := b.waitDone(t, id)
		outs := fmt.Sprint(h["outputs"])
		if !strings.Contains(outs, "@gpu") {
			t.Errorf("history through b: outputs %s not marked with their server", outs)
		}
	}
	if status, body := b.do(t, "GET", "/api/history", nil); status != 200 || !strings.Contains(string(body), ids[0]) {
		t.Errorf("merged history through b: %d, without %s", status, ids[0])
	}
}

// TestReplicasFailoverOnce: with two replicas polling, a server that dies
// mid-queue has its prompts queued again exactly once (only the replica
// holding the lease acts); when that replica is killed first (its lease
// not released), the other takes over when the lease runs out.
func TestReplicasFailoverOnce(t *testing.T) {
	for _, leaderDies := range []bool{false, true} {
		t.Run(fmt.Sprint("leader dies first: ", leaderDies), func(t *testing.T) {
			rs := redistest.Start(t)
			fakes := []*comfytest.Fake{comfytest.New(t, comfytest.Options{}), comfytest.New(t, comfytest.Options{}), comfytest.New(t, comfytest.Options{})}
			for _, fk := range fakes {
				fk.SetNodeDelay(100 * time.Millisecond)
			}
			a, stopA := newReplica(t, rs, fakes, 100*time.Millisecond) // first: the leader
			b, _ := newReplica(t, rs, fakes, 100*time.Millisecond)
			if !leads(a) || leads(b) {
				t.Fatal("replica a should hold the leader lease")
			}
			var ids []string
			for i := range 9 {
				tf := []*testFleet{a, b}[i%2]
				ids = append(ids, tf.queue(t, workflow(fmt.Sprint("fo", i))))
			}
			if leaderDies {
				stopA()
			}
			fakes[0].Close()
			for _, id := range ids {
				b.waitDone(t, id)
			}
			completed := map[string]int{} // server id → runs to completion
			for _, fk := range fakes {
				for _, sid := range fk.Completed() {
					completed[sid]++
				}
			}
			moved := 0
			for _, id := range ids {
				p, _, _ := b.store.Get(context.Background(), id)
				runs := completed[p.ServerID]
				for _, st := range p.Stale {
					runs += completed[st.ServerID]
				}
				if runs != 1 {
					t.Errorf("prompt %s ran to completion %d times; want once (%+v)", id, runs, p)
				}
				moved += p.Moves
			}
			if moved == 0 {
				t.Error("no prompt was queued again; the test needs gpu1 to die with prompts")
			}
			seen := map[string]int{}
			for _, id := range b.historyIDs(t, "") {
				seen[id]++
			}
			for _, id := range ids {
				if seen[id] != 1 {
					t.Errorf("prompt %s is %d times in the merged history; want once", id, seen[id])
				}
			}
		})
	}
}

// leads reports whether tf holds the leader lease.
func leads(tf *testFleet) bool {
	tf.tickMu.Lock()
	defer tf.tickMu.Unlock()
	return tf.lease != nil
}
