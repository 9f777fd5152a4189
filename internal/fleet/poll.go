package fleet

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"sync"
	"time"

	"github.com/comfygate/comfygate/internal/upstream"
)

// downAfter is how many polls in a row must fail before a server that
// still accepts connections is marked down (one refused connection is
// enough).
const downAfter = 2

// Tick polls every server once, then acts on what changed: marks servers
// up or down, notes finished prompts, queues the prompts of dead servers
// elsewhere, removes their stale copies from servers that came back, and
// moves waiting prompts to idle servers.
func (f *Fleet) Tick(ctx context.Context) {
	f.tickMu.Lock()
	defer f.tickMu.Unlock()
	ms := f.all()
	start := time.Now()
	if f.opts.Hub != nil {
		// Sockets first: a server is heard as early as it is polled.
		f.opts.Hub.Sync(ctx, f.pool.All())
	}
	var wg sync.WaitGroup
	for _, m := range ms {
		wg.Go(func() { f.poll(ctx, m) })
	}
	wg.Wait()
	if ctx.Err() != nil {
		return
	}
	active, err := f.store.Active(ctx)
	if err != nil {
		f.log.Warn("fleet: cannot read prompt records", "err", err)
		return
	}
	acting := f.lead(ctx)
	for _, m := range ms {
		up := m.u.Healthy()
		m.mu.Lock()
		changed := up != m.wasUp
		m.wasUp = up
		m.mu.Unlock()
		if changed && up {
			f.log.Info("ComfyUI server is up", "upstream", m.u.Name)
		}
		if up && acting {
			// Copies left on it while it was away (even a blip no tick
			// saw): remove them.
			f.cleanStale(ctx, m, active)
		}
		if changed && !up {
			f.log.Warn("ComfyUI server is down", "upstream", m.u.Name)
		}
	}
	if acting {
		f.reconcile(ctx, ms, active, start)
		f.steal(ctx, ms)
	}
	f.dropDrained(ctx, ms)
	if f.opts.Hub != nil {
		f.opts.Hub.Sync(ctx, f.pool.All())
		f.opts.Hub.Refresh()
	}
	if f.opts.Events.Polled != nil {
		f.opts.Events.Polled(f.Status())
	}
}

// poll reads one server's queue and system stats (and its object_info when
// it is not known or old) and records its health.
func (f *Fleet) poll(ctx context.Context, m *member) {
	pctx, cancel := context.WithTimeout(ctx, f.opts.PollTimeout)
	defer cancel()
	start := time.Now()
	queue, err := f.readQueue(pctx, nil, m)
	if err != nil {
		m.mu.Lock()
		m.fails++
		fails := m.fails
		m.mu.Unlock()
		if fails >= downAfter || upstream.IsDialError(err) {
			m.u.SetHealthy(false)
		}
		return
	}
	st := f.send(pctx, nil, m, http.MethodGet, "/api/system_stats", nil)
	m.mu.Lock()
	m.fails = 0
	m.polledQueue(queue.running, queue.pending, start)
	m.polled = time.Now()
	if st.err == nil && st.status == http.StatusOK {
		m.stats = st.body
		var s struct {
			System struct {
				Version string `json:"comfyui_version"`
			} `json:"system"`
		}
		json.Unmarshal(st.body, &s)
		m.version = s.System.Version
	}
	needInfo := !m.infoBusy && (m.caps == nil || time.Since(m.infoAt) > f.opts.InfoInterval || !m.wasUp)
	if needInfo {
		m.infoBusy = true
	}
	first := m.caps == nil
	m.mu.Unlock()
	m.u.SetHealthy(true)
	if !needInfo {
		return
	}
	// /object_info is large (a megabyte and more) and slow to build on
	// some servers: it has its own time limit and, once known, is read
	// again in the background rather than holding up the tick.
	read := func() {
		ictx, cancel := context.WithTimeout(context.WithoutCancel(ctx), infoTimeout)
		defer cancel()
		f.readInfo(ictx, m)
		m.mu.Lock()
		m.infoBusy = false
		m.mu.Unlock()
	}
	if first {
		read()
	} else {
		go read()
	}
}

// infoTimeout bounds one read of a server's /object_info.
const infoTimeout = 30 * time.Second

// readInfo reads a server's /object_info: its node classes and choices.
func (f *Fleet) readInfo(ctx context.Context, m *member) {
	a := f.send(ctx, nil, m, http.MethodGet, "/api/object_info", nil)
	if a.err != nil || a.status != http.StatusOK {
		f.log.Warn("fleet: cannot read the server's object_info", "upstream", m.u.Name, "status", a.status, "err", a.err)
		return
	}
	caps, err := parseCapabilities(a.body)
	if err != nil {
		f.log.Warn("fleet: the server's object_info is not valid", "upstream", m.u.Name, "err", err)
		return
	}
	m.mu.Lock()
	m.caps, m.objectInfo, m.infoAt = caps, a.body, time.Now()
	clear(m.uploads)
	m.mu.Unlock()
}

// reconcile compares the active prompt records with the servers' queues:
// a prompt no longer queued is done when its server has its history, and
// lost otherwise (the server restarted); a lost prompt, or one on a server
// that is down, is queued again on another server.
func (f *Fleet) reconcile(ctx context.Context, ms []*member, active []Prompt, pollStart time.Time) {
	byName := map[string]*member{}
	for _, m := range ms {
		byName[m.u.Name] = m
	}
	for _, p := range active {
		m := byName[p.Server]
		switch {
		case m == nil || !m.u.Healthy():
			// Its server died or left the fleet: queue it elsewhere.
			f.resubmit(ctx, p, "its server is down")
		case p.Placed.After(pollStart):
			// Queued after the poll began: the poll cannot tell.
		default:
			running, pending := m.inQueue(p.ServerID)
			if running || pending {
				continue
			}
			a := f.send(ctx, nil, m, http.MethodGet, "/api/history/"+p.ServerID, nil)
			if a.err != nil || a.status != http.StatusOK {
				continue // try again next tick
			}
			var h map[string]map[string]any
			if decode(a.body, &h) == nil && h[p.ServerID] != nil {
				f.indexOutputs(ctx, p.Server, h[p.ServerID]["outputs"], p.Owner)
				f.finished(ctx, p)
				continue
			}
			// Neither queued at the poll nor finished. The poll may have
			// begun before another replica queued it (whose clock said
			// otherwise): only a queue read now, after its record was
			// read, can say it is lost.
			if q, err := f.readQueue(ctx, nil, m); err != nil || q.has(p.ServerID) {
				continue
			}
			if a := f.send(ctx, nil, m, http.MethodGet, "/api/history/"+p.ServerID, nil); a.err != nil || a.status != http.StatusOK ||
				decode(a.body, &h) != nil || h[p.ServerID] != nil {
				continue // finished meanwhile: the next tick notes it
			}
			f.resubmit(ctx, p, "its server no longer has it (restarted)")
		}
	}
}

// serverQueue is a server's /queue: its own ids of the prompts running
// and waiting there.
type serverQueue struct{ running, pending []string }

func (q serverQueue) has(sid string) bool {
	return slices.Contains(q.running, sid) || slices.Contains(q.pending, sid)
}

// readQueue reads m's /queue (for the client request in, when not nil).
// The error is the exchange's, or says the answer was not a queue.
func (f *Fleet) readQueue(ctx context.Context, in *http.Request, m *member) (serverQueue, error) {
	a := f.send(ctx, in, m, http.MethodGet, "/api/queue", nil)
	if a.err != nil {
		return serverQueue{}, a.err
	}
	var queue struct {
		Running [][]json.RawMessage `json:"queue_running"`
		Pending [][]json.RawMessage `json:"queue_pending"`
	}
	if a.status != http.StatusOK || json.Unmarshal(a.body, &queue) != nil {
		return serverQueue{}, fmt.Errorf("GET /queue: status %d, not a queue", a.status)
	}
	ids := func(items [][]json.RawMessage) []string {
		out := make([]string, 0, len(items))
		for _, it := range items {
			var id string
			if len(it) > 1 && json.Unmarshal(it[1], &id) == nil {
				out = append(out, id)
			}
		}
		return out
	}
	return serverQueue{ids(queue.Running), ids(queue.Pending)}, nil
}

// leaderLease names the lease of the replica that acts on the records.
const leaderLease = "fleet-leader"

// lead reports whether this gateway acts on the fleet's records this
// tick: always when it is alone; with shared leases, while it holds the
// leader lease (taken when free, renewed every tick, lost when Redis
// cannot say: then nobody acts rather than two).
func (f *Fleet) lead(ctx context.Context) bool {
	if f.opts.Leases == nil {
		return true
	}
	ttl := max(4*f.opts.PollInterval, 5*time.Second)
	if f.lease != nil {
		ok, err := f.lease.Renew(ctx, ttl)
		if err == nil && ok {
			return true
		}
		f.log.Warn("fleet: this replica is no longer the one acting on prompt records", "err", err)
		f.lease = nil
		f.acting.Store(false)
	}
	l, ok, err := f.opts.Leases.Acquire(ctx, leaderLease, ttl)
	if err != nil || !ok {
		return false
	}
	f.log.Info("fleet: this replica now acts on prompt records (requeues, moves, cleanup)")
	f.lease = l
	f.acting.Store(true)
	return true
}

// cleanStale removes from a server that came back the copies of prompts
// that were queued elsewhere while it was down.
func (f *Fleet) cleanStale(ctx context.Context, m *member, active []Prompt) {
	for _, p := range active {
		var keep []Placement
		var gone []string
		for _, st := range p.Stale {
			if st.Server == m.u.Name {
				gone = append(gone, st.ServerID)
			} else {
				keep = append(keep, st)
			}
		}
		if len(gone) == 0 {
			continue
		}
		body, _ := json.Marshal(map[string]any{"delete": gone})
		f.send(ctx, nil, m, http.MethodPost, "/api/queue", body)
		for _, sid := range gone {
			if running, _ := m.inQueue(sid); running {
				b, _ := json.Marshal(map[string]string{"prompt_id": sid})
				f.send(ctx, nil, m, http.MethodPost, "/api/interrupt", b)
			}
		}
		f.log.Info("fleet: removed the copy of a prompt queued elsewhere while its server was down",
			"upstream", m.u.Name, "prompt_id", p.ID)
		p.Stale = keep
		f.store.Put(ctx, p)
	}
}

// dropDrained removes from the pool the draining servers whose queue is
// empty.
func (f *Fleet) dropDrained(ctx context.Context, ms []*member) {
	for _, m := range ms {
		if !m.u.Draining() || m.queueLen() > 0 {
			continue
		}
		active, _ := f.store.Active(ctx)
		if slices.ContainsFunc(active, func(p Prompt) bool { return p.Server == m.u.Name }) {
			continue
		}
		f.pool.Remove(m.u.Name)
		f.mu.Lock()
		delete(f.members, m.u)
		f.mu.Unlock()
		f.log.Info("ComfyUI server left the fleet (drained)", "upstream", m.u.Name)
	}
}
