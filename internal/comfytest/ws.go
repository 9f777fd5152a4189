package comfytest

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"
)

// wsConn is one open WebSocket.
type wsConn struct {
	c   *websocket.Conn
	sid string
	raw net.Conn // the hijacked connection, to cut off a silent peer

	mu sync.Mutex // serializes writes, so the greeting always goes first

	previewMetadata atomic.Bool // the client announced supports_preview_metadata
}

const writeTimeout = 10 * time.Second

func (wc *wsConn) writeLocked(typ websocket.MessageType, b []byte) error {
	ctx, cancel := context.WithTimeout(context.Background(), writeTimeout)
	defer cancel()
	return wc.c.Write(ctx, typ, b)
}

func (wc *wsConn) write(typ websocket.MessageType, b []byte) error {
	wc.mu.Lock()
	defer wc.mu.Unlock()
	return wc.writeLocked(typ, b)
}

// shutdown closes the socket with status 1001, and drops the connection if
// the peer does not complete the close handshake within a second.
func (wc *wsConn) shutdown() {
	done := make(chan struct{})
	go func() {
		defer close(done)
		wc.c.Close(websocket.StatusGoingAway, "server shutting down")
	}()
	t := time.NewTimer(time.Second)
	defer t.Stop()
	select {
	case <-done:
	case <-t.C:
		if wc.raw != nil {
			wc.raw.Close()
		}
		<-done
	}
}

// hijackCapture remembers the connection that coder/websocket hijacks.
type hijackCapture struct {
	http.ResponseWriter
	conn net.Conn
}

func (h *hijackCapture) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	c, brw, err := http.NewResponseController(h.ResponseWriter).Hijack()
	h.conn = c
	return c, brw, err
}

func (h *hijackCapture) Unwrap() http.ResponseWriter { return h.ResponseWriter }

// serveWS is GET /ws (server.py websocket_handler). The origin rule has
// already run in ServeHTTP, so Accept skips its own.
func (f *Fake) serveWS(w http.ResponseWriter, r *http.Request, _ []string) {
	sid := r.URL.Query().Get("clientId")
	if sid == "" {
		var b [16]byte
		rand.Read(b[:])
		sid = hex.EncodeToString(b[:])
	}
	if rw, ok := w.(*responseWriter); ok {
		rw.finish() // records the request, under f.mu: before f.mu is held below
	}
	hc := &hijackCapture{ResponseWriter: w}
	// f.mu is held from before the 101 until the socket is registered. A
	// client may post a prompt the moment it sees the 101; ComfyUI cannot
	// run that POST before its handler has registered the socket (one
	// event loop), and neither may the fake, or the prompt's messages go
	// to no socket and are lost.
	f.mu.Lock()
	c, err := websocket.Accept(hc, r, &websocket.AcceptOptions{
		InsecureSkipVerify: true,
		CompressionMode:    websocket.CompressionDisabled,
	})
	if err != nil {
		f.mu.Unlock()
		f.logf("comfytest: websocket accept: %v", err)
		return
	}
	c.SetReadLimit(4 << 20) // aiohttp's default max_msg_size
	wc := &wsConn{c: c, sid: sid, raw: hc.conn}

	wc.mu.Lock() // nobody else knows wc yet: no order to keep with f.mu
	if f.closed {
		f.mu.Unlock()
		wc.mu.Unlock()
		c.CloseNow()
		return
	}
	f.wg.Add(1)
	defer f.wg.Done()
	// A socket already registered under this sid is forgotten, not closed.
	f.conns[wc] = true
	f.sockets[sid] = wc
	close(f.socketsSeen)
	f.socketsSeen = make(chan struct{})
	remaining := f.queueRemainingLocked()
	var replay string
	if f.running != nil && f.running.clientID == sid {
		replay = f.currentNode
	}
	f.mu.Unlock()
	f.logf("comfytest: websocket %q connected", sid)

	greeting := wsText("status", mustJSON(struct {
		Status any    `json:"status"`
		SID    string `json:"sid"`
	}{execInfo(remaining), sid}))
	wc.writeLocked(websocket.MessageText, greeting)
	if replay != "" {
		wc.writeLocked(websocket.MessageText, wsText("executing", mustJSON(map[string]string{"node": replay})))
	}
	wc.mu.Unlock()

	defer func() {
		c.CloseNow()
		f.mu.Lock()
		delete(f.conns, wc)
		// Like ComfyUI, drop whatever socket is registered under this sid,
		// even a newer one from a reconnect.
		delete(f.sockets, sid)
		f.mu.Unlock()
		f.logf("comfytest: websocket %q closed", sid)
	}()

	first := true
	for {
		typ, data, err := c.Read(f.ctx)
		if err != nil {
			return
		}
		f.mu.Lock()
		f.received[sid] = append(f.received[sid], WSMessage{Binary: typ == websocket.MessageBinary, Data: data})
		f.mu.Unlock()
		if typ != websocket.MessageText || !first {
			continue
		}
		first = false
		var m struct {
			Type string          `json:"type"`
			Data json.RawMessage `json:"data"`
		}
		if json.Unmarshal(data, &m) != nil || m.Type != "feature_flags" {
			continue
		}
		var flags map[string]any
		json.Unmarshal(m.Data, &flags)
		wc.previewMetadata.Store(flags["supports_preview_metadata"] == true)
		wc.write(websocket.MessageText, wsText("feature_flags", sampleFeatures))
	}
}

// wsText builds the {"type": ..., "data": ...} envelope.
func wsText(typ string, data []byte) []byte {
	return mustJSON(struct {
		Type string          `json:"type"`
		Data json.RawMessage `json:"data"`
	}{typ, data})
}

func (f *Fake) broadcastStatus(remaining int) {
	f.broadcast(wsText("status", mustJSON(map[string]any{"status": execInfo(remaining)})))
}

// broadcast sends a text message to every registered socket.
func (f *Fake) broadcast(msg []byte) {
	f.broadcastFrame(websocket.MessageText, msg)
}

func (f *Fake) broadcastFrame(typ websocket.MessageType, msg []byte) {
	f.mu.Lock()
	conns := make([]*wsConn, 0, len(f.sockets))
	for _, wc := range f.sockets {
		conns = append(conns, wc)
	}
	f.mu.Unlock()
	for _, wc := range conns {
		wc.write(typ, msg)
	}
}

func (f *Fake) socket(sid string) *wsConn {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.sockets[sid]
}

// sendTarget sends a message to the socket of clientID only, if there is one.
func (f *Fake) sendTarget(clientID, typ string, data []byte) {
	if clientID == "" {
		return
	}
	if wc := f.socket(clientID); wc != nil {
		wc.write(websocket.MessageText, wsText(typ, data))
	}
}

// sendPreviews sends Options.PreviewFrames binary previews of node id. As in
// ComfyUI, previews of a prompt without client_id go to every socket.
func (f *Fake) sendPreviews(j *job, id string) {
	for range f.opts.PreviewFrames {
		legacy := binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint32(nil, 1), 2)
		legacy = append(legacy, samplePNG...)
		if j.clientID == "" {
			f.broadcastFrame(websocket.MessageBinary, legacy)
			continue
		}
		wc := f.socket(j.clientID)
		if wc == nil {
			return
		}
		frame := legacy
		if wc.previewMetadata.Load() {
			meta := mustJSON(struct {
				NodeID        string  `json:"node_id"`
				PromptID      string  `json:"prompt_id"`
				DisplayNodeID string  `json:"display_node_id"`
				ParentNodeID  *string `json:"parent_node_id"`
				RealNodeID    string  `json:"real_node_id"`
				ImageType     string  `json:"image_type"`
			}{id, j.id, id, nil, id, "image/png"})
			frame = binary.BigEndian.AppendUint32(nil, 4)
			frame = binary.BigEndian.AppendUint32(frame, uint32(len(meta)))
			frame = append(append(frame, meta...), samplePNG...)
		}
		wc.write(websocket.MessageBinary, frame)
	}
}

// Sockets returns the clientIds of the registered sockets, sorted.
func (f *Fake) Sockets() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	ids := make([]string, 0, len(f.sockets))
	for id := range f.sockets {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	return ids
}

// Send pushes one frame to the socket registered under clientID.
func (f *Fake) Send(clientID string, binary bool, data []byte) error {
	wc := f.socket(clientID)
	if wc == nil {
		return fmt.Errorf("comfytest: no socket with clientId %q", clientID)
	}
	typ := websocket.MessageText
	if binary {
		typ = websocket.MessageBinary
	}
	return wc.write(typ, data)
}

// Received returns the frames received from clientID's sockets, in order.
func (f *Fake) Received(clientID string) []WSMessage {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make([]WSMessage, len(f.received[clientID]))
	for i, m := range f.received[clientID] {
		out[i] = WSMessage{m.Binary, slices.Clone(m.Data)}
	}
	return out
}

// WaitSocket waits until a socket is registered under clientID.
func (f *Fake) WaitSocket(ctx context.Context, clientID string) error {
	for {
		f.mu.Lock()
		_, ok := f.sockets[clientID]
		seen := f.socketsSeen
		f.mu.Unlock()
		if ok {
			return nil
		}
		select {
		case <-seen:
		case <-ctx.Done():
			return fmt.Errorf("comfytest: waiting for socket %q: %w", clientID, ctx.Err())
		}
	}
}
