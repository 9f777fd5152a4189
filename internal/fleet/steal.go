package fleet

import (
	"context"
	"encoding/json"
	"net/http"
	"slices"
)

// steal moves waiting prompts to servers that fell idle (late binding):
// for each idle server, the last prompt waiting behind a running one on a
// busy server, if the idle server can run it. The prompt is deleted from
// the busy server's pending queue first, and queued on the idle one only
// once the busy server's queue shows it gone (a prompt that started in the
// meantime stays where it runs). A long prompt then never holds short ones
// hostage.
func (f *Fleet) steal(ctx context.Context, ms []*member) {
	for _, idle := range ms {
		if !idle.usable() || idle.queueLen() > 0 {
			continue
		}
		f.stealFor(ctx, idle, ms)
	}
}

func (f *Fleet) stealFor(ctx context.Context, idle *member, ms []*member) {
	for _, busy := range ms {
		if busy == idle || !busy.u.Healthy() {
			continue
		}
		busy.mu.Lock()
		running := len(busy.running)
		pending := slices.Clone(busy.pending)
		busy.mu.Unlock()
		if running == 0 {
			continue // it starts its next prompt itself
		}
		for i := len(pending) - 1; i >= 0; i-- {
			p, known, err := f.store.ByServerID(ctx, busy.u.Name, pending[i])
			if err != nil || !known || p.Done || p.Body == nil || p.Server != busy.u.Name {
				continue
			}
			var body map[string]json.RawMessage
			var graph map[string]graphNode
			if json.Unmarshal(p.Body, &body) != nil || json.Unmarshal(body["prompt"], &graph) != nil {
				continue
			}
			if x := idle.lacks(graph); x == nil || !x.none() {
				continue
			}
			del, _ := json.Marshal(map[string]any{"delete": []string{p.ServerID}})
			if a := f.send(ctx, nil, busy, http.MethodPost, "/api/queue", del); a.err != nil || a.status != http.StatusOK {
				return
			}
			// Only once it is gone from the busy server's queue.
			if q, err := f.readQueue(ctx, nil, busy); err != nil || q.has(p.ServerID) {
				return
			}
			busy.mu.Lock()
			busy.pending = slices.DeleteFunc(busy.pending, func(s string) bool { return s == p.ServerID })
			busy.mu.Unlock()
			// It was deleted, so nothing of it remains to clean up there.
			if f.move(ctx, p, busy.u.Name, "stolen by an idle server", f.opts.Events.Stolen) ||
				f.move(ctx, p, "", "the idle server refused it", nil) {
				f.dropStale(ctx, p.ID, busy.u.Name)
			}
			return
		}
	}
}

// dropStale forgets a stale placement that is known to be gone.
func (f *Fleet) dropStale(ctx context.Context, id, server string) {
	p, ok, err := f.store.Get(ctx, id)
	if err != nil || !ok {
		return
	}
	p.Stale = slices.DeleteFunc(p.Stale, func(pl Placement) bool { return pl.Server == server })
	f.store.Put(ctx, p)
}
