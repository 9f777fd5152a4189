// Package session keeps browser sessions: after a person logs in with an API
// key, their browser holds an opaque random session id in an HttpOnly
// cookie, and comfygate maps it to the key it was opened with. The key never
// reaches the page, so no script in it (ComfyUI's or a custom node's) can
// read it.
package session

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"net/http"
	"sync"
	"time"
)

// CookieName is the session cookie's name. ComfyUI sets no cookies, so it
// collides with nothing.
const CookieName = "comfygate_session"

// maxSessions bounds the store; past it the oldest expired sessions are
// swept, and if none are expired the login is refused.
const maxSessions = 100_000

// Session is one logged-in browser.
type Session struct {
	KeyID   [32]byte // the key it was opened with
	KeyName string
	Expires time.Time
}

// Store holds sessions in memory, by the SHA-256 of their id, so that even
// a dump of the store does not hold usable cookies. Sessions end at
// logout, at expiry, and when the caller finds their key gone.
type Store struct {
	ttl time.Duration

	mu       sync.Mutex
	sessions map[[32]byte]*Session
}

// NewStore returns a store whose sessions last ttl.
func NewStore(ttl time.Duration) *Store {
	return &Store{ttl: ttl, sessions: make(map[[32]byte]*Session)}
}

// TTL is how long a session lasts.
func (s *Store) TTL() time.Duration { return s.ttl }

// Create opens a session for the key and returns its id, or "" if the store
// is full.
func (s *Store) Create(keyID [32]byte, keyName string) string {
	b := make([]byte, 32)
	rand.Read(b)
	id := base64.RawURLEncoding.EncodeToString(b)
	now := time.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.sessions) >= maxSessions {
		s.sweep(now)
		if len(s.sessions) >= maxSessions {
			return ""
		}
	}
	s.sessions[sha256.Sum256([]byte(id))] = &Session{KeyID: keyID, KeyName: keyName, Expires: now.Add(s.ttl)}
	return id
}

// Get returns the live session with this id.
func (s *Store) Get(id string) (Session, bool) {
	if id == "" || len(id) > 128 {
		return Session{}, false
	}
	h := sha256.Sum256([]byte(id))
	s.mu.Lock()
	defer s.mu.Unlock()
	sess, ok := s.sessions[h]
	if !ok {
		return Session{}, false
	}
	if time.Now().After(sess.Expires) {
		delete(s.sessions, h)
		return Session{}, false
	}
	return *sess, true
}

// Delete ends the session with this id.
func (s *Store) Delete(id string) {
	h := sha256.Sum256([]byte(id))
	s.mu.Lock()
	delete(s.sessions, h)
	s.mu.Unlock()
}

// DeleteKey ends every session opened with the key.
func (s *Store) DeleteKey(keyID [32]byte) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for h, sess := range s.sessions {
		if sess.KeyID == keyID {
			delete(s.sessions, h)
			n++
		}
	}
	return n
}

// Len reports how many sessions are stored (expired ones included until swept).
func (s *Store) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.sessions)
}

func (s *Store) sweep(now time.Time) {
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

// Cookie returns the cookie that carries id. It is HttpOnly (no script can
// read it), SameSite=Lax (not sent on cross-site subrequests or POSTs), and
// Secure when the gateway is reached over HTTPS.
func (s *Store) Cookie(id string, secure bool) *http.Cookie {
	return &http.Cookie{
		Name:     CookieName,
		Value:    id,
		Path:     "/",
		MaxAge:   int(s.ttl / time.Second),
		HttpOnly: true,
		Secure:   secure,
		SameSite: http.SameSiteLaxMode,
	}
}

// ClearCookie returns a cookie that removes the session cookie.
func ClearCookie(secure bool) *http.Cookie {
	return &http.Cookie{Name: CookieName, Value: "", Path: "/", MaxAge: -1, HttpOnly: true, Secure: secure, SameSite: http.SameSiteLaxMode}
}
