package hub

import (
	"context"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/comfygate/comfygate/internal/redistest"
	"github.com/comfygate/comfygate/internal/reqscope"
)

// replica is one gateway replica's hub, relayed through Redis, serving
// client sockets whose key is named by the X-Test-Key header.
type replica struct {
	*Hub
	base string
}

func newReplica(t *testing.T, rs *redistest.Server, isolation bool) *replica {
	t.Helper()
	logger := slog.New(slog.DiscardHandler)
	h := New(nobody{}, Options{Logger: logger, Isolation: isolation,
		Relay: NewRedisRelay(rs.Client(t), "cgtest:", logger)})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { h.Run(ctx); close(done) }()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		sc := &reqscope.Scope{}
		if k := r.Header.Get("X-Test-Key"); k != "" {
			copy(sc.KeyID[:], k)
		}
		h.ServeHTTP(w, r.WithContext(reqscope.NewContext(r.Context(), sc)))
	}))
	t.Cleanup(func() { h.Close(); srv.Close(); cancel(); <-done })
	return &replica{h, "ws" + strings.TrimPrefix(srv.URL, "http") + "/ws?clientId="}
}

// dial opens a client socket with clientId id (and a key when key != "")
// and returns its messages after the greeting.
func (r *replica) dial(t *testing.T, id, key string) <-chan []byte {
	t.Helper()
	opts := &websocket.DialOptions{HTTPHeader: http.Header{}}
	if key != "" {
		opts.HTTPHeader.Set("X-Test-Key", key)
	}
	c, _, err := websocket.Dial(t.Context(), r.base+id, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.CloseNow() })
	ch := make(chan []byte, 100)
	go func() {
		defer close(ch)
		first := true
		for {
			_, b, err := c.Read(context.Background())
			if err != nil {
				return
			}
			if !first {
				ch <- b
			}
			first = false
		}
	}()
	return ch
}

func owner(key string) string {
	var id [32]byte
	copy(id[:], key)
	return Owner(id)
}

func text(s string) outMsg { return outMsg{typ: websocket.MessageText, data: []byte(s)} }

// next returns the next message on ch, or fails after a while.
func next(t *testing.T, ch <-chan []byte) string {
	t.Helper()
	select {
	case b, ok := <-ch:
		if !ok {
			t.Fatal("socket closed")
		}
		return string(b)
	case <-time.After(5 * time.Second):
		t.Fatal("no message within 5s")
	}
	return ""
}

// waitSubscribed waits until n sockets of Redis listen on id's channel.
func waitSubscribed(t *testing.T, rs *redistest.Server, id string, n int64) {
	t.Helper()
	rdb := rs.Client(t)
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		m, err := rdb.PubSubNumSub(t.Context(), "cgtest:ws:"+id).Result()
		if err == nil && m["cgtest:ws:"+id] == n {
			return
		}
	}
	t.Fatalf("channel of %s never had %d subscribers", id, n)
}

// TestRelayAcrossReplicas: a prompt's messages, sent by the server to the
// replica that queued it, reach the client's socket on another replica in
// order, previews included, and a socket on the sending replica gets each
// once.
func TestRelayAcrossReplicas(t *testing.T) {
	rs := redistest.Start(t)
	a, b := newReplica(t, rs, false), newReplica(t, rs, false)
	onB := b.dial(t, "x", "")
	onA := a.dial(t, "x", "")
	waitSubscribed(t, rs, "x", 2)

	msgs := []outMsg{text(`{"type":"execution_start"}`), {typ: websocket.MessageBinary, data: []byte{0, 0, 0, 1, 0, 0, 0, 2, 'j'}, preview: true}, text(`{"type":"executing","data":{"node":null}}`)}
	for _, m := range msgs {
		a.deliver("x", "", m)
	}
	for _, ch := range []<-chan []byte{onB, onA} {
		for _, m := range msgs {
			if got := next(t, ch); got != string(m.data) {
				t.Fatalf("got %q; want %q", got, m.data)
			}
		}
	}
	// Nothing more: A's own socket did not get A's messages back
	// through Redis.
	a.deliver("x", "", text(`{"type":"marker"}`))
	for _, ch := range []<-chan []byte{onB, onA} {
		if got := next(t, ch); got != `{"type":"marker"}` {
			t.Errorf("got %q after the messages; want the marker (a duplicate?)", got)
		}
	}
}

// TestRelayIsolation: across replicas too, a socket gets a prompt's
// messages only when it was opened with the key that queued the prompt;
// an anonymous socket with the same clientId gets none.
func TestRelayIsolation(t *testing.T) {
	rs := redistest.Start(t)
	a, b := newReplica(t, rs, true), newReplica(t, rs, true)
	alice := b.dial(t, "x", "alice")
	mallory := b.dial(t, "x", "mallory")
	anon := b.dial(t, "x", "")
	waitSubscribed(t, rs, "x", 1)

	a.deliver("x", owner("alice"), text(`{"type":"executed","data":{"secret":1}}`))
	a.deliver("x", owner("mallory"), text(`{"type":"mine"}`))
	if got := next(t, alice); !strings.Contains(got, "secret") {
		t.Errorf("alice got %q; want her prompt's message", got)
	}
	if got := next(t, mallory); got != `{"type":"mine"}` {
		t.Errorf("mallory got %q; want only her own prompt's message", got)
	}
	select {
	case m := <-anon:
		t.Errorf("an anonymous socket with alice's clientId got %q", m)
	case <-time.After(200 * time.Millisecond):
	}
}

// TestRelayFollowsSockets: a replica listens to a client id only while it
// has sockets of it, and again when one comes back.
func TestRelayFollowsSockets(t *testing.T) {
	rs := redistest.Start(t)
	a, b := newReplica(t, rs, false), newReplica(t, rs, false)
	ctx, cancel := context.WithCancel(t.Context())
	c, _, err := websocket.Dial(ctx, b.base+"y", nil)
	if err != nil {
		t.Fatal(err)
	}
	waitSubscribed(t, rs, "y", 1)
	c.CloseNow()
	cancel()
	waitSubscribed(t, rs, "y", 0)
	again := b.dial(t, "y", "")
	waitSubscribed(t, rs, "y", 1)
	a.deliver("y", "", text(`{"type":"back"}`))
	if got := next(t, again); got != `{"type":"back"}` {
		t.Errorf("got %q", got)
	}
}

// TestRelayPayload pins the relayed message's encoding.
func TestRelayPayload(t *testing.T) {
	for _, m := range []Message{
		{Data: []byte(`{"type":"status"}`)},
		{Binary: true, Data: []byte{0, 1, '\n', 2}},
		{Binary: true, Preview: true, Data: []byte("\n\n")},
		{Data: []byte{}},
	} {
		origin, owner, got, err := decodeRelayed(string(encodeRelayed("o1", "ab\x00c", m)))
		if err != nil || origin != "o1" || owner != "ab\x00c" || got.Binary != m.Binary || got.Preview != m.Preview || string(got.Data) != string(m.Data) {
			t.Errorf("%+v: got %q %q %+v %v", m, origin, owner, got, err)
		}
	}
	for _, bad := range []string{"", "2x\n\n-\n", "1o\nowner"} {
		if _, _, _, err := decodeRelayed(bad); err == nil {
			t.Errorf("%q decoded", bad)
		}
	}
}

// BenchmarkRelay is the time from a server's message reaching the hub to
// the client's socket reading it, one message at a time: for a socket on
// the same replica, and for one on another replica through Redis on
// loopback. go test -bench Relay -run ^$ ./internal/hub
func BenchmarkRelay(b *testing.B) {
	rs := redistest.Start(b)
	a, other := newBenchReplica(b, rs), newBenchReplica(b, rs)
	for _, bc := range []struct {
		name string
		to   *replica
	}{{"local", a}, {"relayed", other}} {
		b.Run(bc.name, func(b *testing.B) {
			id := "bench-" + bc.name
			c, _, err := websocket.Dial(b.Context(), bc.to.base+id, nil)
			if err != nil {
				b.Fatal(err)
			}
			defer c.CloseNow()
			c.Read(b.Context()) // the greeting
			msg := text(`{"type":"progress","data":{"value":1,"max":20,"prompt_id":"p","node":"3"}}`)
			for b.Loop() {
				a.deliver(id, "", msg)
				if _, _, err := c.Read(b.Context()); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func newBenchReplica(b *testing.B, rs *redistest.Server) *replica {
	logger := slog.New(slog.DiscardHandler)
	h := New(nobody{}, Options{Logger: logger, Relay: NewRedisRelay(rs.Client(b), "cgbench:", logger)})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { h.Run(ctx); close(done) }()
	srv := httptest.NewServer(h)
	b.Cleanup(func() { h.Close(); srv.Close(); cancel(); <-done })
	return &replica{h, "ws" + strings.TrimPrefix(srv.URL, "http") + "/ws?clientId="}
}
