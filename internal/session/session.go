// Package session keeps browser sessions: after a person logs in with an API
// key, their browser holds an opaque random session id in an HttpOnly
// cookie, and comfygate maps it to the key it was opened with. The key never
// reaches the page, so no script in it (ComfyUI's or a custom node's) can
// read it.
//
// Sessions live in a Store: Memory, the default, or Redis, which several
// gateway replicas share (--redis). Both keep sessions by the SHA-256 of
// their id, never the id itself, so that even a dump of the store holds no
// usable cookie, and a lookup's timing says nothing about the ids held.
package session

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"net/http"
	"sync"
	"time"
)

// CookieName is the session cookie's name. ComfyUI sets no cookies, so it
// collides with nothing.
const CookieName = "comfygate_session"

// maxIDLen bounds the ids looked up: ours are 43 characters.
const maxIDLen = 128

// ErrFull is returned by Create when the store holds as many sessions as it
// may.
var ErrFull = errors.New("too many open sessions")

// Session is one logged-in browser.
type Session struct {
	KeyID   [32]byte // the key it was opened with
	KeyName string
	Expires time.Time
}

// Store holds sessions. Sessions end at logout, at expiry, and when the
// caller finds their key gone. An error means the store could not be
// asked (a shared store that is down): the caller decides what that means,
// and must not take it for "no session".
type Store interface {
	// Create opens a session for the key and returns its id.
	Create(ctx context.Context, keyID [32]byte, keyName string) (string, error)
	// Get returns the live session with this id; ok is false when there is
	// none (unknown, expired or ended).
	Get(ctx context.Context, id string) (s Session, ok bool, err error)
	// Delete ends the session with this id, if there is one.
	Delete(ctx context.Context, id string) error
	// DeleteKey ends every session opened with the key and says how many.
	DeleteKey(ctx context.Context, keyID [32]byte) (int, error)
	// TTL is how long a session lasts.
	TTL() time.Duration
}

// newID returns a fresh session id: 256 random bits, URL-safe.
func newID() string {
	b := make([]byte, 32)
	rand.Read(b)
	return base64.RawURLEncoding.EncodeToString(b)
}

// lookupHash returns the hash a store files id under, or false for an id
// that cannot be one of ours.
func lookupHash(id string) ([32]byte, bool) {
	if id == "" || len(id) > maxIDLen {
		return [32]byte{}, false
	}
	return sha256.Sum256([]byte(id)), true
}

// maxSessions bounds the memory store; past it the expired sessions are
// swept, and if none are expired the login is refused.
const maxSessions = 100_000

// Memory is the Store of a single gateway: sessions in memory, by the
// SHA-256 of their id. A restart ends every session.
type Memory struct {
	ttl time.Duration

	mu       sync.Mutex
	sessions map[[32]byte]*Session
}

// NewMemory returns a memory store whose sessions last ttl.
func NewMemory(ttl time.Duration) *Memory {
	return &Memory{ttl: ttl, sessions: make(map[[32]byte]*Session)}
}

// TTL is how long a session lasts.
func (s *Memory) TTL() time.Duration { return s.ttl }

// Create opens a session for the key and returns its id, or ErrFull.
func (s *Memory) Create(_ context.Context, keyID [32]byte, keyName string) (string, error) {
	id := newID()
	now := time.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.sessions) >= maxSessions {
		s.sweep(now)
		if len(s.sessions) >= maxSessions {
			return "", ErrFull
		}
	}
	s.sessions[sha256.Sum256([]byte(id))] = &Session{KeyID: keyID, KeyName: keyName, Expires: now.Add(s.ttl)}
	return id, nil
}

// Get returns the live session with this id.
func (s *Memory) Get(_ context.Context, id string) (Session, bool, error) {
	h, ok := lookupHash(id)
	if !ok {
		return Session{}, false, nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	sess, ok := s.sessions[h]
	if !ok {
		return Session{}, false, nil
	}
	if time.Now().After(sess.Expires) {
		delete(s.sessions, h)
		return Session{}, false, nil
	}
	return *sess, true, nil
}

// Delete ends the session with this id.
func (s *Memory) Delete(_ context.Context, id string) error {
	h, ok := lookupHash(id)
	if !ok {
		return nil
	}
	s.mu.Lock()
	delete(s.sessions, h)
	s.mu.Unlock()
	return nil
}

// DeleteKey ends every session opened with the key.
func (s *Memory) DeleteKey(_ context.Context, keyID [32]byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for h, sess := range s.sessions {
		if sess.KeyID == keyID {
			delete(s.sessions, h)
			n++
		}
	}
	return n, nil
}

// Len reports how many sessions are stored (expired ones included until swept).
func (s *Memory) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.sessions)
}

func (s *Memory) sweep(now time.Time) {
	for h, sess := range s.sessions {
		if now.After(sess.Expires) {
			delete(s.sessions, h)
		}
	}
}

// FromRequest returns the session id the request's cookie carries, or "".
func FromRequest(r *http.Request) string {
	c, err := r.Cookie(CookieName)
	if err != nil {
		return ""
	}
	return c.Value
}

// Cookie returns the cookie that carries id for ttl. It is HttpOnly (no
// script can read it), SameSite=Lax (not sent on cross-site subrequests or
// POSTs), and Secure when the gateway is reached over HTTPS.
func Cookie(id string, ttl time.Duration, secure bool) *http.Cookie {
	return &http.Cookie{
		Name:     CookieName,
		Value:    id,
		Path:     "/",
		MaxAge:   int(ttl / time.Second),
		HttpOnly: true,
		Secure:   secure,
		SameSite: http.SameSiteLaxMode,
	}
}

// ClearCookie returns a cookie that removes the session cookie.
func ClearCookie(secure bool) *http.Cookie {
	return &http.Cookie{Name: CookieName, Value: "", Path: "/", MaxAge: -1, HttpOnly: true, Secure: secure, SameSite: http.SameSiteLaxMode}
}

var _ Store = (*Memory)(nil)
