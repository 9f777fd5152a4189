package hub

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/coder/websocket"
	"github.com/redis/go-redis/v9"
)

// A Relay carries messages between the hubs of gateway replicas that share
// state (--redis). A server sends a prompt's messages to the replica that
// queued it; the client's socket may be on another replica (the load
// balancer chose another for the socket than for the POST). Each hub
// delivers to its own sockets and publishes every message for a client id;
// a hub with sockets of that id subscribes to it.
type Relay interface {
	// Publish sends m, meant for the sockets of client id (under isolation
	// only those of owner), to the other replicas. It must not block: a
	// relay that falls behind drops previews first.
	Publish(id, owner string, m Message)
	// Subscribe and Unsubscribe are called for each socket of client id
	// that opens and closes: while one is open, what other replicas
	// publish for id is received. Subscribe returns once it is (or after
	// a short wait when it cannot be), so that the socket misses nothing
	// of a prompt queued right after it opened.
	Subscribe(id string)
	Unsubscribe(id string)
	// Run hands what other replicas publish for subscribed ids to deliver,
	// until ctx ends.
	Run(ctx context.Context, deliver func(id, owner string, m Message))
}

// Message is one WebSocket message for a client.
type Message struct {
	Binary  bool
	Preview bool // a binary preview: the first to drop when behind
	Data    []byte
}

func (m outMsg) message() Message {
	return Message{Binary: m.typ == websocket.MessageBinary, Preview: m.preview, Data: m.data}
}

func fromMessage(m Message) outMsg {
	typ := websocket.MessageText
	if m.Binary {
		typ = websocket.MessageBinary
	}
	return outMsg{typ: typ, data: m.Data, preview: m.Preview}
}

// RedisRelay is a Relay over Redis pub/sub: one channel per client id,
// prefix + "ws:" + id. A message is published as a small header (the
// publishing replica, the owner, flags) and the message's bytes.
type RedisRelay struct {
	rdb    redis.UniversalClient
	prefix string
	origin string // this replica, to skip its own messages
	log    *slog.Logger

	out chan relayed // to publish, in order

	mu        sync.Mutex
	subs      map[string]int             // open sockets by id: the ids to be subscribed
	confirmed map[string]bool            // ids Redis confirmed subscribed
	waiters   map[string][]chan struct{} // Subscribe calls waiting for confirmation
	wake      chan struct{}              // subs changed
}

type relayed struct {
	id, owner string
	m         Message
}

// relayQueue bounds the messages waiting to be published.
const relayQueue = 1024

// NewRedisRelay returns a Relay over rdb, on channels named with prefix.
func NewRedisRelay(rdb redis.UniversalClient, prefix string, logger *slog.Logger) *RedisRelay {
	if logger == nil {
		logger = slog.Default()
	}
	var b [8]byte
	rand.Read(b[:])
	return &RedisRelay{rdb: rdb, prefix: prefix + "ws:", origin: hex.EncodeToString(b[:]), log: logger,
		out:  make(chan relayed, relayQueue),
		subs: map[string]int{}, confirmed: map[string]bool{}, waiters: map[string][]chan struct{}{}, wake: make(chan struct{}, 1)}
}

// Publish implements Relay.
func (r *RedisRelay) Publish(id, owner string, m Message) {
	select {
	case r.out <- relayed{id, owner, m}:
	default:
		if !m.Preview {
			r.log.Warn("hub relay: Redis is too slow; a message for another replica's socket was dropped", "client_id", id)
		}
	}
}

// subscribeWait bounds how long Subscribe waits for Redis.
const subscribeWait = time.Second

// Subscribe implements Relay.
func (r *RedisRelay) Subscribe(id string) {
	r.mu.Lock()
	r.subs[id]++
	if r.confirmed[id] {
		r.mu.Unlock()
		return
	}
	ready := make(chan struct{})
	r.waiters[id] = append(r.waiters[id], ready)
	r.mu.Unlock()
	r.poke()
	select {
	case <-ready:
	case <-time.After(subscribeWait):
	}
}

// Unsubscribe implements Relay.
func (r *RedisRelay) Unsubscribe(id string) {
	r.mu.Lock()
	if r.subs[id]--; r.subs[id] <= 0 {
		delete(r.subs, id)
	}
	r.mu.Unlock()
	r.poke()
}

// subscribed notes Redis's confirmation (or end) of a subscription.
func (r *RedisRelay) subscribed(channel string, on bool) {
	id, ok := strings.CutPrefix(channel, r.prefix)
	if !ok {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if !on {
		delete(r.confirmed, id)
		return
	}
	if r.subs[id] > 0 {
		r.confirmed[id] = true
	}
	for _, w := range r.waiters[id] {
		close(w)
	}
	delete(r.waiters, id)
}

func (r *RedisRelay) poke() {
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

// Run implements Relay: it publishes what this replica's hub sends and
// delivers what the others publish.
func (r *RedisRelay) Run(ctx context.Context, deliver func(id, owner string, m Message)) {
	ps := r.rdb.Subscribe(ctx)
	defer ps.Close()
	go r.publish(ctx)
	go r.follow(ctx, ps)
	in := ps.ChannelWithSubscriptions()
	for {
		select {
		case <-ctx.Done():
			return
		case x, ok := <-in:
			if !ok {
				return
			}
			switch msg := x.(type) {
			case *redis.Subscription:
				r.subscribed(msg.Channel, msg.Kind == "subscribe")
			case *redis.Message:
				origin, owner, m, err := decodeRelayed(msg.Payload)
				if err != nil || origin == r.origin {
					continue
				}
				deliver(strings.TrimPrefix(msg.Channel, r.prefix), owner, m)
			}
		}
	}
}

// follow keeps ps subscribed to the channels of the ids asked for. A
// failed call is tried again at the next change or after a second; once
// subscribed, go-redis subscribes again by itself after a reconnect.
func (r *RedisRelay) follow(ctx context.Context, ps *redis.PubSub) {
	have := map[string]bool{}
	retry := time.NewTicker(time.Second)
	defer retry.Stop()
	for {
		r.mu.Lock()
		var add, drop []string
		for id := range r.subs {
			if !have[id] {
				add = append(add, r.prefix+id)
			}
		}
		for id := range have {
			if r.subs[id] == 0 {
				drop = append(drop, r.prefix+id)
				delete(r.confirmed, id)
			}
		}
		r.mu.Unlock()
		if len(add) > 0 && ps.Subscribe(ctx, add...) == nil {
			for _, ch := range add {
				have[strings.TrimPrefix(ch, r.prefix)] = true
			}
		}
		if len(drop) > 0 && ps.Unsubscribe(ctx, drop...) == nil {
			for _, ch := range drop {
				delete(have, strings.TrimPrefix(ch, r.prefix))
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-r.wake:
		case <-retry.C:
		}
	}
}

// publish sends the queued messages, in order.
func (r *RedisRelay) publish(ctx context.Context) {
	failing := false
	for {
		select {
		case <-ctx.Done():
			return
		case x := <-r.out:
			err := r.rdb.Publish(ctx, r.prefix+x.id, encodeRelayed(r.origin, x.owner, x.m)).Err()
			if err != nil && ctx.Err() == nil && !failing {
				r.log.Warn("hub relay: cannot publish to Redis; sockets on other replicas miss messages until it is back", "err", err)
			}
			if err == nil && failing {
				r.log.Info("hub relay: publishing to Redis again")
			}
			failing = err != nil
		}
	}
}

// The payload of a relayed message: "1" origin "\n" owner "\n" flags "\n"
// data, flags being "b" (binary) and "p" (preview) or "-".
func encodeRelayed(origin, owner string, m Message) []byte {
	flags := "-"
	switch {
	case m.Binary && m.Preview:
		flags = "bp"
	case m.Binary:
		flags = "b"
	}
	var b bytes.Buffer
	b.Grow(len(origin) + len(owner) + len(flags) + 4 + len(m.Data))
	b.WriteString("1" + origin + "\n" + owner + "\n" + flags + "\n")
	b.Write(m.Data)
	return b.Bytes()
}

var errRelayed = errors.New("hub relay: malformed message")

func decodeRelayed(p string) (origin, owner string, m Message, err error) {
	parts := strings.SplitN(p, "\n", 4)
	if len(parts) != 4 || !strings.HasPrefix(parts[0], "1") {
		return "", "", m, errRelayed
	}
	flags := parts[2]
	m = Message{Binary: strings.HasPrefix(flags, "b"), Preview: flags == "bp", Data: []byte(parts[3])}
	return parts[0][1:], parts[1], m, nil
}
