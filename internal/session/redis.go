package session

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/redis/go-redis/v9"
)

// Redis is a Store in Redis, shared by every gateway replica that uses the
// same Redis: a session opened on one is accepted by all, and logout or the
// removal of its key ends it everywhere. Redis expires sessions itself.
//
// Keys, under the prefix:
//
//	session:<hex SHA-256 of the id>   JSON {key, name, exp}, expiring with the session
//	session-key:<hex key id>          set of the hashes of the key's sessions,
//	                                  expiring with its newest session
//
// The id itself is never sent to Redis.
type Redis struct {
	rdb    redis.UniversalClient
	prefix string
	ttl    time.Duration
}

// NewRedis returns a store in rdb, under keys that start with prefix
// (redisstate.Prefix), whose sessions last ttl.
func NewRedis(rdb redis.UniversalClient, prefix string, ttl time.Duration) *Redis {
	return &Redis{rdb: rdb, prefix: prefix, ttl: ttl}
}

// redisSession is a session as stored.
type redisSession struct {
	KeyID   string `json:"key"`
	KeyName string `json:"name"`
	Expires int64  `json:"exp"` // Unix milliseconds
}

func (s *Redis) sessionKey(h [32]byte) string {
	return s.prefix + "session:" + hex.EncodeToString(h[:])
}

func (s *Redis) indexKey(keyID [32]byte) string {
	return s.prefix + "session-key:" + hex.EncodeToString(keyID[:])
}

// TTL is how long a session lasts.
func (s *Redis) TTL() time.Duration { return s.ttl }

// Create opens a session for the key and returns its id.
func (s *Redis) Create(ctx context.Context, keyID [32]byte, keyName string) (string, error) {
	id := newID()
	h, _ := lookupHash(id)
	v, err := json.Marshal(redisSession{KeyID: hex.EncodeToString(keyID[:]), KeyName: keyName, Expires: time.Now().Add(s.ttl).UnixMilli()})
	if err != nil {
		return "", err
	}
	idx := s.indexKey(keyID)
	_, err = s.rdb.TxPipelined(ctx, func(p redis.Pipeliner) error {
		p.Set(ctx, s.sessionKey(h), v, s.ttl)
		p.SAdd(ctx, idx, hex.EncodeToString(h[:]))
		p.PExpire(ctx, idx, s.ttl) // the newest session lives longest
		return nil
	})
	if err != nil {
		return "", fmt.Errorf("session store: %w", err)
	}
	return id, nil
}

// Get returns the live session with this id.
func (s *Redis) Get(ctx context.Context, id string) (Session, bool, error) {
	h, ok := lookupHash(id)
	if !ok {
		return Session{}, false, nil
	}
	v, err := s.rdb.Get(ctx, s.sessionKey(h)).Bytes()
	if errors.Is(err, redis.Nil) {
		return Session{}, false, nil
	}
	if err != nil {
		return Session{}, false, fmt.Errorf("session store: %w", err)
	}
	sess, ok := decode(v)
	if !ok || time.Now().After(sess.Expires) {
		return Session{}, false, nil
	}
	return sess, true, nil
}

func decode(v []byte) (Session, bool) {
	var rs redisSession
	if json.Unmarshal(v, &rs) != nil {
		return Session{}, false
	}
	b, err := hex.DecodeString(rs.KeyID)
	sess := Session{KeyName: rs.KeyName, Expires: time.UnixMilli(rs.Expires)}
	if err != nil || len(b) != len(sess.KeyID) {
		return Session{}, false
	}
	copy(sess.KeyID[:], b)
	return sess, true
}

// Delete ends the session with this id.
func (s *Redis) Delete(ctx context.Context, id string) error {
	h, ok := lookupHash(id)
	if !ok {
		return nil
	}
	v, err := s.rdb.GetDel(ctx, s.sessionKey(h)).Bytes()
	if errors.Is(err, redis.Nil) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("session store: %w", err)
	}
	// The session is gone; its entry in the key's index only tidies up.
	if sess, ok := decode(v); ok {
		if err := s.rdb.SRem(ctx, s.indexKey(sess.KeyID), hex.EncodeToString(h[:])).Err(); err != nil {
			return fmt.Errorf("session store: %w", err)
		}
	}
	return nil
}

// deleteKeyScript ends every session in a key's index, and the index,
// atomically: a session opened meanwhile is either in the index (and
// ended) or opened after (and the key's removal is the caller's concern).
// KEYS[1] is the index; ARGV[1] the prefix of session keys.
var deleteKeyScript = redis.NewScript(`
local n = 0
for _, h in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  n = n + redis.call('DEL', ARGV[1] .. h)
end
redis.call('DEL', KEYS[1])
return n
`)

// DeleteKey ends every session opened with the key.
func (s *Redis) DeleteKey(ctx context.Context, keyID [32]byte) (int, error) {
	n, err := deleteKeyScript.Run(ctx, s.rdb, []string{s.indexKey(keyID)}, s.prefix+"session:").Int()
	if err != nil {
		return 0, fmt.Errorf("session store: %w", err)
	}
	return n, nil
}

var _ Store = (*Redis)(nil)
