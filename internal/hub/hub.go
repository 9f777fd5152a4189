// Package hub carries ComfyUI's WebSocket messages in fleet mode. The
// gateway holds one socket to each ComfyUI server under a client id of its
// own (every prompt is queued with that id, so each server sends the
// gateway all its execution messages), and clients hold sockets to the
// gateway. A message goes to the sockets of the client that queued its
// prompt; a binary preview, which names no prompt, to the client of the
// prompt that server is executing. The gateway sends its own status
// messages, with the fleet's queue.
//
// The hub knows sockets and who gets a message; what a message means
// (which prompt, which client, how to rewrite it) is asked of a Router, the
// fleet.
package hub

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"net/url"
	"sync"
	"time"

	"github.com/coder/websocket"

	"github.com/comfygate/comfygate/internal/reqscope"
	"github.com/comfygate/comfygate/internal/upstream"
)

// Router says where a server's message goes and how the client sees it.
type Router interface {
	// Route rewrites a text message from server for the client that queued
	// its prompt (ids as the client knows them, file references marked),
	// and returns that client's id ("" when the message is no client's)
	// and the owner of its prompt (the key that queued it).
	Route(server string, msg map[string]any) (clientID, owner string)
	// Missed returns, for a server whose socket was down since the given
	// time, the messages that matter of the prompts that ended meanwhile
	// (their outputs and end signals), as the server would have sent them.
	Missed(server string, since time.Time) []map[string]any
}

// Options configure a Hub.
type Options struct {
	// Isolation delivers a prompt's messages only to sockets opened with
	// the key that queued it (--isolation keys); a socket without a key
	// gets status messages only.
	Isolation bool
	// ID is the client id the gateway uses on every server; the fleet
	// queues every prompt with it. Empty: a random one.
	ID string
	// ClientQueue bounds the messages waiting for one client socket.
	// Default 64. A client that falls that far behind loses previews
	// first, then its socket (closed with 1008).
	ClientQueue int
	// Relay, if set, carries messages to and from the hubs of other
	// gateway replicas (see Run).
	Relay Relay
	// WriteTimeout bounds one write to a client. Default 10s.
	WriteTimeout time.Duration
	// Logger; nil: slog.Default().
	Logger *slog.Logger
}

// Hub is the set of client sockets and server sockets.
type Hub struct {
	router Router
	opts   Options
	log    *slog.Logger
	// ID is the client id the gateway uses on every server.
	ID string

	mu      sync.Mutex
	clients map[string]map[*client]bool // by clientId
	servers map[*upstream.Upstream]*serverConn
	flags   json.RawMessage // a server's feature_flags answer
	lastQ   int
}

// QueueRemaining is the fleet's queue as the servers last reported it in
// their status messages: pending and running prompts.
func (h *Hub) QueueRemaining() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.queueLocked()
}

func (h *Hub) queueLocked() int {
	n := 0
	for _, sc := range h.servers {
		n += sc.queue
	}
	return n
}

// New returns a Hub whose messages are routed by router.
func New(router Router, opts Options) *Hub {
	if opts.ClientQueue <= 0 {
		opts.ClientQueue = 64
	}
	if opts.WriteTimeout <= 0 {
		opts.WriteTimeout = 10 * time.Second
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.ID == "" {
		var b [8]byte
		rand.Read(b[:])
		opts.ID = "comfygate-" + hex.EncodeToString(b[:])
	}
	return &Hub{router: router, opts: opts, log: opts.Logger, ID: opts.ID,
		clients: map[string]map[*client]bool{}, servers: map[*upstream.Upstream]*serverConn{}, lastQ: -1}
}

// outMsg is one message for a client.
type outMsg struct {
	typ     websocket.MessageType
	data    []byte
	preview bool
}

// client is one client socket.
type client struct {
	h     *Hub
	id    string
	keyID [32]byte // the key that opened it (zero: none)
	owner string   // the key as the fleet names owners ("" without a key)
	conn  *websocket.Conn
	queue chan outMsg
	done  chan struct{}
	once  sync.Once
}

// close ends c: it gets no more messages from now on, and its socket is
// closed with code (the close handshake may take a while with a client
// that does not read).
func (c *client) close(code websocket.StatusCode, reason string) {
	c.once.Do(func() {
		close(c.done)
		c.h.remove(c)
		go c.conn.Close(code, reason)
	})
}

// remove forgets client c.
func (h *Hub) remove(c *client) {
	h.mu.Lock()
	defer h.mu.Unlock()
	set, ok := h.clients[c.id]
	if !ok || !set[c] {
		return
	}
	delete(set, c)
	if len(set) == 0 {
		delete(h.clients, c.id)
	}
	if h.opts.Relay != nil {
		h.opts.Relay.Unsubscribe(c.id)
	}
}

// send queues m for c without blocking. A full queue drops a preview; a
// message that matters closes the socket instead.
func (h *Hub) send(c *client, m outMsg) {
	select {
	case c.queue <- m:
	case <-c.done:
	default:
		if m.preview {
			return
		}
		h.log.Warn("closing a WebSocket that cannot keep up with its messages", "client_id", c.id)
		c.close(websocket.StatusPolicyViolation, "too slow to keep up")
	}
}

// ServeHTTP accepts a client socket: /ws?clientId=X (a new id when none).
func (h *Hub) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	w.Header().Del("Connection")
	id := r.URL.Query().Get("clientId")
	if id == "" {
		var b [16]byte
		rand.Read(b[:])
		id = hex.EncodeToString(b[:])
	}
	conn, err := websocket.Accept(w, r, nil)
	if err != nil {
		return // Accept answered
	}
	conn.SetReadLimit(1 << 20)
	sc := reqscope.From(r.Context())
	c := &client{h: h, id: id, keyID: sc.KeyID, owner: Owner(sc.KeyID), conn: conn, queue: make(chan outMsg, h.opts.ClientQueue), done: make(chan struct{})}
	greeting, _ := json.Marshal(map[string]any{"type": "status", "data": map[string]any{
		"status": map[string]any{"exec_info": map[string]any{"queue_remaining": h.QueueRemaining()}},
		"sid":    id,
	}})
	c.queue <- outMsg{typ: websocket.MessageText, data: greeting}
	if h.opts.Relay != nil {
		// Before the socket counts as open: a prompt queued through
		// another replica right after must not be missed.
		h.opts.Relay.Subscribe(id)
	}
	h.mu.Lock()
	if h.clients[id] == nil {
		h.clients[id] = map[*client]bool{}
	}
	h.clients[id][c] = true
	h.mu.Unlock()
	defer h.remove(c)

	go h.readClient(c)
	for {
		select {
		case <-c.done:
			return
		case m := <-c.queue:
			ctx, cancel := context.WithTimeout(r.Context(), h.opts.WriteTimeout)
			err := conn.Write(ctx, m.typ, m.data)
			cancel()
			if err != nil {
				c.close(websocket.StatusInternalError, "write failed")
				return
			}
		}
	}
}

// readClient reads what a client sends: feature_flags is answered as the
// servers answer it; anything else is ignored (ComfyUI ignores it too).
func (h *Hub) readClient(c *client) {
	defer c.close(websocket.StatusNormalClosure, "")
	answered := false
	for {
		typ, data, err := c.conn.Read(context.Background())
		if err != nil {
			return
		}
		if typ != websocket.MessageText || answered {
			continue
		}
		var m struct {
			Type string `json:"type"`
		}
		if json.Unmarshal(data, &m) == nil && m.Type == "feature_flags" {
			answered = true
			h.mu.Lock()
			flags := h.flags
			h.mu.Unlock()
			if flags != nil {
				b, _ := json.Marshal(map[string]any{"type": "feature_flags", "data": flags})
				h.send(c, outMsg{typ: websocket.MessageText, data: b})
			}
		}
	}
}

// Owner names the key with identity id as the fleet names the owner of a
// prompt ("" for no key).
func Owner(id [32]byte) string {
	if id == ([32]byte{}) {
		return ""
	}
	return hex.EncodeToString(id[:8])
}

// deliver sends a message to every socket of client id (under isolation,
// of the prompt's owner only), here and, through the relay, on the other
// replicas.
func (h *Hub) deliver(id, owner string, m outMsg) {
	if id == "" {
		return
	}
	if h.opts.Relay != nil {
		h.opts.Relay.Publish(id, owner, m.message())
	}
	h.deliverHere(id, owner, m)
}

// Run carries messages to and from the other replicas' hubs through the
// relay until ctx ends; without a relay it returns at once.
func (h *Hub) Run(ctx context.Context) {
	if h.opts.Relay == nil {
		return
	}
	h.opts.Relay.Run(ctx, func(id, owner string, m Message) {
		h.deliverHere(id, owner, fromMessage(m))
	})
}

// deliverHere sends a message to this replica's sockets of client id.
func (h *Hub) deliverHere(id, owner string, m outMsg) {
	h.mu.Lock()
	cs := make([]*client, 0, len(h.clients[id]))
	for c := range h.clients[id] {
		if h.opts.Isolation && (c.owner == "" || c.owner != owner) {
			continue
		}
		cs = append(cs, c)
	}
	h.mu.Unlock()
	for _, c := range cs {
		h.send(c, m)
	}
}

// broadcastStatus sends every client the fleet's queue when it changed.
func (h *Hub) broadcastStatus() {
	h.mu.Lock()
	q := h.queueLocked()
	if q == h.lastQ {
		h.mu.Unlock()
		return
	}
	h.lastQ = q
	var cs []*client
	for _, set := range h.clients {
		for c := range set {
			cs = append(cs, c)
		}
	}
	h.mu.Unlock()
	b, _ := json.Marshal(map[string]any{"type": "status", "data": map[string]any{
		"status": map[string]any{"exec_info": map[string]any{"queue_remaining": q}}}})
	for _, c := range cs {
		h.send(c, outMsg{typ: websocket.MessageText, data: b})
	}
}

// Refresh tells clients the fleet's queue if it changed since last told,
// and drops held messages that waited too long.
func (h *Hub) Refresh() {
	h.broadcastStatus()
	h.Placed("")
}

// serverConn is the gateway's socket to one server.
type serverConn struct {
	u      *upstream.Upstream
	cancel context.CancelFunc
	// current and currentOwner are the client and owner of the prompt the
	// server is executing, for its binary previews.
	current, currentOwner string
	// queue is the server's queue_remaining from its last status.
	queue int
	// added is when the hub started keeping a socket to the server.
	added time.Time

	// held are the server's messages waiting for the first of them to be
	// routable: a prompt's first messages can arrive before the fleet has
	// recorded whose prompt it is (its server answers the POST after it
	// queued the prompt). Everything behind waits too, to keep the order.
	heldMu sync.Mutex
	held   []heldMsg
}

// heldMsg is one message from a server, parsed when it is text.
type heldMsg struct {
	typ  websocket.MessageType
	data []byte
	msg  map[string]any
	at   time.Time
}

// holdFor is how long a message whose prompt is unknown waits for the
// fleet to record it before it is dropped as nobody's.
const holdFor = 3 * time.Second

// Sync keeps one socket to each server of ups and closes those of servers
// that left.
func (h *Hub) Sync(ctx context.Context, ups []*upstream.Upstream) {
	h.mu.Lock()
	defer h.mu.Unlock()
	keep := map[*upstream.Upstream]bool{}
	for _, u := range ups {
		keep[u] = true
		if h.servers[u] == nil {
			sctx, cancel := context.WithCancel(ctx)
			sc := &serverConn{u: u, cancel: cancel, added: time.Now()}
			h.servers[u] = sc
			go h.runServer(sctx, sc)
		}
	}
	for u, sc := range h.servers {
		if !keep[u] {
			sc.cancel()
			delete(h.servers, u)
		}
	}
}

// CloseKeys ends the client sockets opened with any of the keys in ids,
// with 1008 ("API key revoked"), and returns how many it closed.
func (h *Hub) CloseKeys(ids map[[32]byte]bool) int {
	h.mu.Lock()
	var cs []*client
	for _, set := range h.clients {
		for c := range set {
			if ids[c.keyID] {
				cs = append(cs, c)
			}
		}
	}
	h.mu.Unlock()
	for _, c := range cs {
		c.close(websocket.StatusPolicyViolation, "API key revoked")
	}
	return len(cs)
}

// Open counts the client sockets.
func (h *Hub) Open() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	n := 0
	for _, set := range h.clients {
		n += len(set)
	}
	return n
}

// Close ends every client socket with 1001 (going away).
func (h *Hub) Close() {
	h.mu.Lock()
	var cs []*client
	for _, set := range h.clients {
		for c := range set {
			cs = append(cs, c)
		}
	}
	h.mu.Unlock()
	for _, c := range cs {
		c.close(websocket.StatusGoingAway, "gateway shutting down")
	}
}

// runServer keeps the socket to one server open, redialling with backoff.
func (h *Hub) runServer(ctx context.Context, sc *serverConn) {
	backoff := 250 * time.Millisecond
	// down is when the last socket closed. Before the first one opens,
	// it is when the server joined: a prompt the fleet queued there
	// before the socket opened is told too.
	down := sc.added
	for ctx.Err() == nil {
		start := time.Now()
		err := h.serveServer(ctx, sc, down)
		down = time.Now()
		if ctx.Err() != nil {
			return
		}
		if time.Since(start) > 10*time.Second {
			backoff = 250 * time.Millisecond
		}
		h.log.Debug("hub: socket to ComfyUI closed; redialling", "upstream", sc.u.Name, "err", err, "in", backoff)
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, 5*time.Second)
	}
}

func (h *Hub) serveServer(ctx context.Context, sc *serverConn, down time.Time) error {
	wsURL := *sc.u.URL
	wsURL.Scheme = map[string]string{"https": "wss"}[sc.u.URL.Scheme]
	if wsURL.Scheme == "" {
		wsURL.Scheme = "ws"
	}
	wsURL.Path = wsURL.JoinPath("ws").Path
	wsURL.RawQuery = url.Values{"clientId": {h.ID}}.Encode()
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	conn, _, err := websocket.Dial(dctx, wsURL.String(), &websocket.DialOptions{HTTPClient: &http.Client{Transport: sc.u}})
	cancel()
	if err != nil {
		return err
	}
	defer conn.CloseNow()
	conn.SetReadLimit(64 << 20) // previews and SaveImageWebsocket images
	// Ask for the server's feature flags (newer servers answer), without
	// announcing preview metadata: previews stay the classic frames every
	// client reads.
	conn.Write(ctx, websocket.MessageText, []byte(`{"type":"feature_flags","data":{}}`))
	// What clients missed that matters while there was no socket comes
	// first (the server's own messages wait in the socket meanwhile).
	missed := h.router.Missed(sc.u.Name, down)
	sc.heldMu.Lock()
	for _, m := range missed {
		data, _ := json.Marshal(m)
		sc.held = append(sc.held, heldMsg{typ: websocket.MessageText, data: data, msg: m, at: time.Now()})
	}
	h.flush(sc)
	sc.heldMu.Unlock()
	h.mu.Lock()
	sc.current, sc.currentOwner = "", ""
	h.mu.Unlock()
	for {
		typ, data, err := conn.Read(ctx)
		if err != nil {
			if errors.Is(err, context.Canceled) {
				return nil
			}
			return err
		}
		m := heldMsg{typ: typ, data: data, at: time.Now()}
		if typ == websocket.MessageText {
			if json.Unmarshal(data, &m.msg) != nil {
				continue
			}
		}
		sc.heldMu.Lock()
		sc.held = append(sc.held, m)
		h.flush(sc)
		sc.heldMu.Unlock()
	}
}

// Placed tells the hub that the fleet recorded a prompt on server: its
// held messages may now be routed.
func (h *Hub) Placed(server string) {
	h.mu.Lock()
	var scs []*serverConn
	for u, sc := range h.servers {
		if server == "" || u.Name == server {
			scs = append(scs, sc)
		}
	}
	h.mu.Unlock()
	for _, sc := range scs {
		sc.heldMu.Lock()
		h.flush(sc)
		sc.heldMu.Unlock()
	}
}

// flush delivers the held messages of sc in order, up to the first one
// that cannot be routed yet. sc.heldMu is held.
func (h *Hub) flush(sc *serverConn) {
	for len(sc.held) > 0 {
		m := sc.held[0]
		if !h.route(sc, m) && time.Since(m.at) < holdFor {
			return
		}
		sc.held[0] = heldMsg{}
		sc.held = sc.held[1:]
	}
	sc.held = nil
}

// route delivers one message; false when it names a prompt that is not
// known yet.
func (h *Hub) route(sc *serverConn, m heldMsg) bool {
	if m.typ == websocket.MessageBinary {
		h.mu.Lock()
		to, owner := sc.current, sc.currentOwner
		h.mu.Unlock()
		h.deliver(to, owner, outMsg{typ: m.typ, data: m.data, preview: true})
		return true
	}
	return h.serverText(sc, m.msg, m.data)
}

// serverText routes one text message from a server; false when it names
// a prompt that is not known yet.
func (h *Hub) serverText(sc *serverConn, msg map[string]any, data []byte) bool {
	typ, _ := msg["type"].(string)
	switch typ {
	case "status":
		// The gateway's own status messages, with the fleet's queue,
		// replace the servers'.
		var st struct {
			Data struct {
				Status struct {
					ExecInfo struct {
						QueueRemaining int `json:"queue_remaining"`
					} `json:"exec_info"`
				} `json:"status"`
			} `json:"data"`
		}
		if json.Unmarshal(data, &st) == nil {
			h.mu.Lock()
			sc.queue = st.Data.Status.ExecInfo.QueueRemaining
			h.mu.Unlock()
		}
		h.broadcastStatus()
		return true
	case "feature_flags":
		if d, err := json.Marshal(msg["data"]); err == nil {
			h.mu.Lock()
			if h.flags == nil {
				h.flags = d
			}
			h.mu.Unlock()
		}
		return true
	}
	to, owner := h.router.Route(sc.u.Name, msg)
	if d, _ := msg["data"].(map[string]any); to == "" && d["prompt_id"] != nil {
		return false
	}
	if to == "" {
		// A message that names no prompt (a custom node's, or an old
		// build's executing without an id) belongs to the prompt running.
		h.mu.Lock()
		to, owner = sc.current, sc.currentOwner
		h.mu.Unlock()
	}
	data, err := json.Marshal(msg)
	if err != nil {
		return true
	}
	h.deliver(to, owner, outMsg{typ: websocket.MessageText, data: data})
	d, _ := msg["data"].(map[string]any)
	h.mu.Lock()
	switch typ {
	case "execution_start":
		sc.current, sc.currentOwner = to, owner
	case "executing":
		if d["node"] == nil {
			sc.current, sc.currentOwner = "", ""
		} else {
			sc.current, sc.currentOwner = to, owner
		}
	case "execution_error", "execution_interrupted":
		sc.current, sc.currentOwner = "", ""
	}
	h.mu.Unlock()
	return true
}
