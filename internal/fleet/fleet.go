// Package fleet makes several ComfyUI servers answer as one. It sends each
// prompt to a server that can run it and will finish it first (capability,
// then an idle server, then one that has the prompt's models loaded, then
// the shortest queue), keeps the prompt id a client sees the same whichever
// server runs it, answers the queue, history and node routes as one
// ComfyUI would by merging every server's answer, moves waiting prompts to
// servers that fall idle, and queues the prompts of a server that dies on
// another one.
//
// The fleet knows ComfyUI; the upstream pool knows servers; the proxy
// decides what a request to a server holds (proxy.Outbound) and carries
// requests that go to one server (proxy.Forward). Routes are told apart by
// the route table's policy, read from the request's scope.
package fleet

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/comfygate/comfygate/internal/hub"
	"github.com/comfygate/comfygate/internal/jsonerr"
	"github.com/comfygate/comfygate/internal/proxy"
	"github.com/comfygate/comfygate/internal/reqscope"
	"github.com/comfygate/comfygate/internal/route"
	"github.com/comfygate/comfygate/internal/upstream"
)

// Options configure a Fleet. The zero value of each field has a default.
type Options struct {
	// Store keeps prompt records; nil keeps them in memory.
	Store Store
	// Leases, shared by gateway replicas (--redis), elect the one replica
	// that acts on the fleet's records: queues a dead server's prompts
	// again, moves waiting prompts to idle servers, removes stale copies.
	// Every replica polls and dispatches. Nil: this gateway is alone and
	// always acts.
	Leases Leases
	// PollInterval is how often every server's /queue and /system_stats
	// are read. Default 2s.
	PollInterval time.Duration
	// PollTimeout bounds one poll. Default: PollInterval, at least 2s.
	PollTimeout time.Duration
	// InfoInterval is how often /object_info is read again. Default 5m.
	InfoInterval time.Duration
	// MaxBodyBytes caps the bodies the fleet reads itself (prompts and
	// uploads); 0: 100 MB.
	MaxBodyBytes int64
	// UploadDir holds uploads while they are copied to every server; ""
	// means the system's temporary folder.
	UploadDir string
	// ClientID, if set, replaces the client_id of every prompt queued on
	// a server: the socket hub's id, so that each server sends the gateway
	// the prompt's messages. The client's own id is kept in the record.
	ClientID string
	// Isolation keeps each key to its own prompts, outputs and uploads
	// (--isolation keys); admin-scope keys see everything.
	Isolation bool
	// Hub, if set, carries the sockets (/ws): Tick keeps its server
	// sockets in step with the pool.
	Hub *hub.Hub
	// Events, if set, is told what the fleet does (metrics).
	Events Events
	// Logger receives what the fleet does; nil: slog.Default().
	Logger *slog.Logger
}

// Events are the fleet's counters, for metrics. Nil fields are skipped.
type Events struct {
	// Dispatched: a prompt was queued on server.
	Dispatched func(server string)
	// Resubmitted: a prompt of a server that died or lost it was queued
	// again on server to.
	Resubmitted func(from, to string)
	// Stolen: a waiting prompt was moved from a busy server to an idle one.
	Stolen func(from, to string)
	// Polled: the state of every server after a tick.
	Polled func([]ServerStatus)
}

// ServerStatus is what the fleet knows of one server, for /health and the
// metrics.
type ServerStatus struct {
	Name     string
	Healthy  bool
	Draining bool
	// Pending and Running are the server's queue at its last poll.
	Pending, Running int
	// Version is the server's comfyui_version.
	Version string
	// Nodes counts the node classes read from its /object_info (0 before
	// the first read).
	Nodes int
	// SystemStats is its last /system_stats answer (nil before one).
	SystemStats json.RawMessage
}

// Status returns the state of every server, in the pool's order.
func (f *Fleet) Status() []ServerStatus {
	var out []ServerStatus
	for _, m := range f.all() {
		m.mu.Lock()
		out = append(out, ServerStatus{
			Name: m.u.Name, Healthy: m.u.Healthy(), Draining: m.u.Draining(),
			Pending: len(m.pending), Running: len(m.running),
			Version: m.version, SystemStats: m.stats,
		})
		if m.caps != nil {
			out[len(out)-1].Nodes = len(m.caps.classes)
		}
		m.mu.Unlock()
	}
	return out
}

// Fleet routes requests over the servers of a pool. It is an http.Handler
// for the end of the gateway's chain.
type Fleet struct {
	pool  *upstream.Pool
	proxy *proxy.Proxy
	store Store
	opts  Options
	log   *slog.Logger

	mu      sync.Mutex
	members map[*upstream.Upstream]*member

	// tickMu makes a tick (polls, failover, stealing) run alone.
	tickMu sync.Mutex
	// lease is the leader lease while this replica holds it (under tickMu);
	// acting mirrors lease != nil for readers outside the tick.
	lease  Lease
	acting atomic.Bool
	// chooseMu makes choosing a server and counting a prompt on it one
	// step.
	chooseMu sync.Mutex
	// kick asks Run for a tick now (a server finished a prompt).
	kick chan struct{}
}

// New returns a Fleet over the servers of pool, reached through p.
func New(pool *upstream.Pool, p *proxy.Proxy, opts Options) *Fleet {
	if opts.Store == nil {
		opts.Store = NewMemoryStore(0)
	}
	if opts.PollInterval <= 0 {
		opts.PollInterval = 2 * time.Second
	}
	if opts.PollTimeout <= 0 {
		opts.PollTimeout = max(opts.PollInterval, 2*time.Second)
	}
	if opts.InfoInterval <= 0 {
		opts.InfoInterval = 5 * time.Minute
	}
	if opts.MaxBodyBytes <= 0 {
		opts.MaxBodyBytes = 100 << 20
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	return &Fleet{pool: pool, proxy: p, store: opts.Store, opts: opts, log: opts.Logger,
		members: map[*upstream.Upstream]*member{}, kick: make(chan struct{}, 1)}
}

// Acting reports whether this gateway acts on the fleet's records (always
// when it is alone; with shared leases, while it holds the lease).
func (f *Fleet) Acting() bool {
	return f.opts.Leases == nil || f.acting.Load()
}

// member returns the state of server u.
func (f *Fleet) member(u *upstream.Upstream) *member {
	f.mu.Lock()
	defer f.mu.Unlock()
	m := f.members[u]
	if m == nil {
		m = newMember(u)
		f.members[u] = m
	}
	return m
}

// all returns the members of every server in the pool, in its order.
func (f *Fleet) all() []*member {
	ups := f.pool.All()
	out := make([]*member, len(ups))
	for i, u := range ups {
		out[i] = f.member(u)
	}
	return out
}

// byName returns the member of the server named name.
func (f *Fleet) byName(name string) (*member, bool) {
	u, ok := f.pool.Get(name)
	if !ok {
		return nil, false
	}
	return f.member(u), true
}

// healthy returns the members of the servers that are up.
func (f *Fleet) healthy() []*member {
	var out []*member
	for _, m := range f.all() {
		if m.u.Healthy() {
			out = append(out, m)
		}
	}
	return out
}

// Run polls the servers until ctx ends. It reads each server once before
// it returns the first time through ready (closed then), so that the first
// prompts find the servers' capabilities known.
func (f *Fleet) Run(ctx context.Context, ready chan<- struct{}) {
	f.Tick(ctx)
	if ready != nil {
		close(ready)
	}
	t := time.NewTicker(f.opts.PollInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			f.tickMu.Lock()
			if f.lease != nil {
				// Another replica may act at once, not when the lease
				// runs out.
				rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
				f.lease.Release(rctx)
				cancel()
				f.lease = nil
				f.acting.Store(false)
			}
			f.tickMu.Unlock()
			return
		case <-t.C:
			f.Tick(ctx)
		case <-f.kick:
			// A server finished a prompt: it may be idle with prompts
			// waiting elsewhere (stealing), and its record is done.
			f.Tick(ctx)
			t.Reset(f.opts.PollInterval)
		}
	}
}

// ServeHTTP answers r by its route's fleet policy.
func (f *Fleet) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	e := reqscope.From(r.Context()).Route
	switch e.Policy {
	case route.PolicyDispatch:
		f.dispatch(w, r)
	case route.PolicyMerge:
		f.merge(w, r, e)
	case route.PolicyOwner:
		f.owner(w, r, e)
	case route.PolicyAll:
		f.fanout(w, r, e)
	case route.PolicyAnyHealthy:
		f.forwardAny(w, r)
	case route.PolicySocket:
		if f.opts.Hub != nil && upgradeRequested(r) {
			f.opts.Hub.ServeHTTP(w, r)
			return
		}
		f.forwardPrimary(w, r)
	default: // primary: user data, custom-node routes, anything unknown
		f.forwardPrimary(w, r)
	}
}

// upgradeRequested reports whether r asks for a WebSocket.
func upgradeRequested(r *http.Request) bool {
	return strings.EqualFold(r.Header.Get("Upgrade"), "websocket")
}

// forwardPrimary sends r to the first server: user data (workflows,
// settings) lives there, so the web UI sees one consistent store.
func (f *Fleet) forwardPrimary(w http.ResponseWriter, r *http.Request) {
	ups := f.pool.All()
	if len(ups) == 0 {
		f.proxy.Fail(w, r, "", upstream.ErrNoUpstream)
		return
	}
	f.proxy.Forward(w, r, ups[0])
}

// forwardAny sends r to the first healthy server.
func (f *Fleet) forwardAny(w http.ResponseWriter, r *http.Request) {
	u, err := f.pool.Pick()
	if err != nil {
		f.proxy.Fail(w, r, "", err)
		return
	}
	f.proxy.Forward(w, r, u)
}

// answer is one server's complete answer to a request of the fleet's.
type answer struct {
	m      *member
	status int
	header http.Header
	body   []byte
	err    error
}

// maxAnswer bounds an answer the fleet reads whole (a long /history).
const maxAnswer = 256 << 20

// send makes one request to m on behalf of in (nil: the gateway's own) and
// reads the answer whole.
func (f *Fleet) send(ctx context.Context, in *http.Request, m *member, method, target string, body []byte) answer {
	if in == nil {
		in = (&http.Request{Method: method, Header: http.Header{}, Host: m.u.URL.Host}).WithContext(ctx)
	} else {
		in = in.WithContext(ctx)
	}
	out, err := f.proxy.Outbound(in, m.u, method, target, body)
	if err != nil {
		return answer{m: m, err: err}
	}
	if body != nil {
		out.Header.Set("Content-Type", "application/json")
	}
	res, err := f.proxy.RoundTrip(m.u, out)
	if err != nil {
		return answer{m: m, err: err}
	}
	defer res.Body.Close()
	b, err := io.ReadAll(io.LimitReader(res.Body, maxAnswer+1))
	if err == nil && len(b) > maxAnswer {
		err = fmt.Errorf("answer larger than %d bytes", maxAnswer)
	}
	return answer{m: m, status: res.StatusCode, header: res.Header, body: b, err: err}
}

// sendAll makes the same request to every member of ms at once.
func (f *Fleet) sendAll(ctx context.Context, in *http.Request, ms []*member, method, target string, body []byte) []answer {
	out := make([]answer, len(ms))
	var wg sync.WaitGroup
	for i, m := range ms {
		wg.Go(func() { out[i] = f.send(ctx, in, m, method, target, body) })
	}
	wg.Wait()
	return out
}

// writeJSON answers with a JSON document the fleet made.
func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		jsonerr.Write(w, http.StatusInternalServerError, "internal_error", "the gateway could not encode its answer")
		return
	}
	writeRaw(w, status, b)
}

func writeRaw(w http.ResponseWriter, status int, b []byte) {
	h := w.Header()
	h.Del("Connection")
	h.Set("Content-Type", "application/json; charset=utf-8")
	h.Set("Content-Length", fmt.Sprint(len(b)))
	w.WriteHeader(status)
	w.Write(b)
}

// relay passes one server's answer on as it came.
func relay(w http.ResponseWriter, a answer) {
	h := w.Header()
	h.Del("Connection")
	for _, k := range []string{"Content-Type", "Cache-Control", "Content-Disposition"} {
		if v := a.header.Get(k); v != "" {
			h.Set(k, v)
		}
	}
	h.Set("Content-Length", fmt.Sprint(len(a.body)))
	w.WriteHeader(a.status)
	w.Write(a.body)
}

// firstError returns the error to answer with when no server answered.
func firstError(as []answer) (string, error) {
	for _, a := range as {
		if a.err != nil {
			return a.m.u.Name, a.err
		}
	}
	return "", upstream.ErrNoUpstream
}

// readBody reads a request body the fleet needs whole, capped.
func (f *Fleet) readBody(w http.ResponseWriter, r *http.Request) ([]byte, error) {
	w.Header().Del("Connection")
	if r.ContentLength > f.opts.MaxBodyBytes {
		return nil, &http.MaxBytesError{Limit: f.opts.MaxBodyBytes}
	}
	b, err := io.ReadAll(http.MaxBytesReader(w, r.Body, f.opts.MaxBodyBytes))
	if err != nil {
		var mb *http.MaxBytesError
		if errors.As(err, &mb) {
			return nil, err
		}
		return nil, &proxy.ClientBodyError{Err: err}
	}
	return b, nil
}

// finished records that p ended on its server (its request is no longer
// needed to queue it again).
func (f *Fleet) finished(ctx context.Context, p Prompt) {
	p.Done, p.Body, p.Finished = true, nil, time.Now()
	f.store.Put(ctx, p)
}

// Missed returns the messages clients missed while the hub's socket to
// server was down since the given time: for each prompt of server that
// ended meanwhile, its outputs (executed), its last status message
// (execution_success, _error or _interrupted) and the end signal
// (executing with node null), built from the server's history.
func (f *Fleet) Missed(server string, since time.Time) []map[string]any {
	ctx, cancel := context.WithTimeout(context.Background(), f.opts.PollTimeout)
	defer cancel()
	m, ok := f.byName(server)
	if !ok {
		return nil
	}
	var ps []Prompt
	active, _ := f.store.Active(ctx)
	for _, p := range active {
		if p.Server == server && p.Placed.Before(time.Now()) {
			ps = append(ps, p)
		}
	}
	done, _ := f.store.FinishedSince(ctx, server, since)
	ps = append(ps, done...)
	var out []map[string]any
	for _, p := range ps {
		a := f.send(ctx, nil, m, http.MethodGet, "/api/history/"+url.PathEscape(p.ServerID), nil)
		var h map[string]struct {
			Outputs map[string]any `json:"outputs"`
			Status  struct {
				Messages [][]any `json:"messages"`
			} `json:"status"`
		}
		if a.err != nil || a.status != http.StatusOK || decode(a.body, &h) != nil {
			continue
		}
		e, ok := h[p.ServerID]
		if !ok {
			continue // still queued or running: its messages are to come
		}
		nodes := make([]string, 0, len(e.Outputs))
		for node := range e.Outputs {
			nodes = append(nodes, node)
		}
		sort.Strings(nodes)
		for _, node := range nodes {
			out = append(out, map[string]any{"type": "executed", "data": map[string]any{
				"node": node, "display_node": node, "output": e.Outputs[node], "prompt_id": p.ServerID}})
		}
		if n := len(e.Status.Messages); n > 0 && len(e.Status.Messages[n-1]) == 2 {
			last := e.Status.Messages[n-1]
			if typ, ok := last[0].(string); ok {
				out = append(out, map[string]any{"type": typ, "data": last[1]})
			}
		}
		out = append(out, map[string]any{"type": "executing", "data": map[string]any{"node": nil, "prompt_id": p.ServerID}})
	}
	return out
}

// Route rewrites a WebSocket message from server for the client that
// queued its prompt, and returns that client's id and the prompt's owner
// (the hub's Router). The files of an executed message are recorded as
// the owner's.
func (f *Fleet) Route(server string, msg map[string]any) (clientID, owner string) {
	d, _ := msg["data"].(map[string]any)
	sid, _ := d["prompt_id"].(string)
	if sid == "" {
		return "", ""
	}
	ctx := context.Background()
	p, ok, err := f.store.ByServerID(ctx, server, sid)
	if err != nil || !ok {
		return "", ""
	}
	d["prompt_id"] = p.ID
	if out, ok := d["output"]; ok {
		f.indexOutputs(ctx, server, out, p.Owner)
		markFiles(out, server)
	}
	if typ, _ := msg["type"].(string); typ == "executing" && d["node"] == nil && !p.Done && p.Server == server && p.ServerID == sid {
		// The end signal: done now, not at the next poll, so that a
		// server that dies right after is not thought to have died with
		// it (and the prompt is not run twice).
		f.finished(ctx, p)
		if m, ok := f.byName(server); ok {
			m.ended(sid)
		}
		select {
		case f.kick <- struct{}{}:
		default:
		}
	}
	return p.ClientID, p.Owner
}
