package auth

import (
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"fmt"
	"unicode/utf8"

	"github.com/comfygate/comfygate/internal/route"
)

// MinRecommendedKeyLen is the length under which a key gets a start-up warning.
const MinRecommendedKeyLen = 16

// maxKeyLen bounds the work done per candidate credential; no real key is longer.
const maxKeyLen = 4096

// KeyID identifies a key inside the process: the SHA-256 of its secret. It
// is never logged or sent anywhere.
type KeyID [sha256.Size]byte

// A Key is one configured API key: a name that appears in logs and the audit
// trail, the scope it grants, and a SHA-256 hash of the secret. The
// plaintext is not kept.
type Key struct {
	Name  string
	Scope route.Scope
	// Short is true when the secret is known to be shorter than
	// MinRecommendedKeyLen (never set for keys given only as a hash).
	Short bool
	id    KeyID
}

// NewKey hashes secret into a Key with the admin scope. It does not
// validate the secret; call CheckSecret first.
func NewKey(name, secret string) Key {
	return Key{Name: name, Scope: route.ScopeAdmin, Short: len(secret) < MinRecommendedKeyLen, id: sha256.Sum256([]byte(secret))}
}

// ID returns the key's in-process identity.
func (k Key) ID() KeyID { return k.id }

// HashSecret returns the hex SHA-256 of secret, as written in key files.
func HashSecret(secret string) string {
	h := sha256.Sum256([]byte(secret))
	return fmt.Sprintf("%x", h[:])
}

// KeySet is an immutable set of keys. The zero value and nil hold no keys.
type KeySet struct {
	keys  []Key
	byID  map[KeyID]int
	names map[string]bool
}

// NewKeySet returns a set holding keys. A secret listed twice keeps its
// first entry.
func NewKeySet(keys ...Key) *KeySet {
	s := &KeySet{byID: make(map[KeyID]int, len(keys)), names: make(map[string]bool, len(keys))}
	for _, k := range keys {
		if _, dup := s.byID[k.id]; dup {
			continue
		}
		s.byID[k.id] = len(s.keys)
		s.names[k.Name] = true
		s.keys = append(s.keys, k)
	}
	return s
}

// Len reports how many distinct keys the set holds.
func (s *KeySet) Len() int {
	if s == nil {
		return 0
	}
	return len(s.keys)
}

// Enabled reports whether authentication is on, that is whether any key is configured.
func (s *KeySet) Enabled() bool { return s.Len() > 0 }

// Keys returns the keys in the set (names, scopes and hashes only).
func (s *KeySet) Keys() []Key {
	if s == nil {
		return nil
	}
	return append([]Key(nil), s.keys...)
}

// Has reports whether the set holds the key with this id.
func (s *KeySet) Has(id KeyID) bool {
	if s == nil {
		return false
	}
	_, ok := s.byID[id]
	return ok
}

// ByID returns the key with this id.
func (s *KeySet) ByID(id KeyID) (Key, bool) {
	if s == nil {
		return Key{}, false
	}
	i, ok := s.byID[id]
	if !ok {
		return Key{}, false
	}
	return s.keys[i], true
}

// Lookup returns the key whose secret is candidate.
//
// The candidate is hashed first and the set is searched by hash. Timing can
// then depend only on the hash, which tells an attacker nothing about any
// key's secret: there is no prefix of a secret to guess one byte at a time.
// The final comparison is constant-time all the same.
func (s *KeySet) Lookup(candidate string) (Key, bool) {
	if s.Len() == 0 || len(candidate) == 0 || len(candidate) > maxKeyLen {
		return Key{}, false
	}
	h := KeyID(sha256.Sum256([]byte(candidate)))
	i, ok := s.byID[h]
	if !ok || subtle.ConstantTimeCompare(h[:], s.keys[i].id[:]) != 1 {
		return Key{}, false
	}
	return s.keys[i], true
}

// Errors that CheckSecret returns, for callers that branch on them.
var (
	ErrEmptyKey   = errors.New("key is empty")
	ErrKeySpace   = errors.New("key contains whitespace")
	ErrKeyControl = errors.New("key contains a control character")
	ErrKeyASCII   = errors.New("key contains a non-ASCII character (HTTP headers cannot carry it reliably)")
	ErrKeyLong    = fmt.Errorf("key is longer than %d characters", maxKeyLen)
)

// CheckSecret reports why secret cannot work as an API key, or nil. A key
// must be non-empty printable ASCII without spaces, so that it survives an
// HTTP header, a query string and a copy-paste unchanged.
func CheckSecret(secret string) error {
	if secret == "" {
		return ErrEmptyKey
	}
	if len(secret) > maxKeyLen {
		return ErrKeyLong
	}
	for i := 0; i < len(secret); i++ {
		c := secret[i]
		switch {
		case c >= utf8.RuneSelf:
			return ErrKeyASCII
		case c == ' ' || c == '\t':
			return ErrKeySpace
		case c < 0x20 || c == 0x7f:
			return ErrKeyControl
		}
	}
	return nil
}
