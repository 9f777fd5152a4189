package auth

import (
	"bufio"
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"fmt"
	"io"
	"strings"
	"unicode/utf8"
)

// MinRecommendedKeyLen is the length under which a key gets a start-up warning.
const MinRecommendedKeyLen = 16

// maxKeyLen bounds the work done per candidate credential; no real key is longer.
const maxKeyLen = 4096

// A Key is one configured API key: a name that appears in logs and a SHA-256
// hash of the secret. The plaintext is not kept.
type Key struct {
	Name string
	// Short is true when the secret is shorter than MinRecommendedKeyLen.
	Short bool
	hash  [sha256.Size]byte
}

// NewKey hashes secret under name. It does not validate the secret; call
// CheckSecret first.
func NewKey(name, secret string) Key {
	return Key{Name: name, Short: len(secret) < MinRecommendedKeyLen, hash: sha256.Sum256([]byte(secret))}
}

// KeySet is an immutable set of keys. The zero value and nil hold no keys.
type KeySet struct {
	keys []Key
}

// Keys returns the keys in the set (names and hashes only).
func (s *KeySet) Keys() []Key {
	if s == nil {
		return nil
	}
	return append([]Key(nil), s.keys...)
}

// NewKeySet returns a set holding keys. Duplicate secrets keep the first name.
func NewKeySet(keys ...Key) *KeySet {
	s := &KeySet{}
	seen := make(map[[sha256.Size]byte]bool, len(keys))
	for _, k := range keys {
		if seen[k.hash] {
			continue
		}
		seen[k.hash] = true
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

// Lookup reports whether candidate is one of the keys, and its name.
//
// The candidate is hashed and compared with every key in constant time, and
// the loop does not stop at a match, so the time taken does not depend on
// which key matched or how much of a key was right.
func (s *KeySet) Lookup(candidate string) (name string, ok bool) {
	if s.Len() == 0 || len(candidate) == 0 || len(candidate) > maxKeyLen {
		return "", false
	}
	h := sha256.Sum256([]byte(candidate))
	found := -1
	for i := range s.keys {
		if subtle.ConstantTimeCompare(h[:], s.keys[i].hash[:]) == 1 {
			found = i
		}
	}
	if found < 0 {
		return "", false
	}
	return s.keys[found].Name, true
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

// LineError is a problem with one line of a key file.
type LineError struct {
	Line int
	Err  error
}

func (e *LineError) Error() string { return fmt.Sprintf("line %d: %v", e.Line, e.Err) }
func (e *LineError) Unwrap() error { return e.Err }

// ParseKeyFile reads a key file: one key per line, surrounding whitespace
// trimmed (so `echo key > file` works), blank lines and lines starting with
// '#' ignored. Key names are "key-1", "key-2", … in file order.
//
// It reports every bad line at once, as LineErrors joined with errors.Join,
// and never includes a key's text in an error.
func ParseKeyFile(r io.Reader) ([]Key, error) {
	var (
		keys []Key
		errs []error
	)
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 4096), 1<<20)
	n := 0
	for sc.Scan() {
		n++
		line := sc.Text()
		if n == 1 {
			line = strings.TrimPrefix(line, "\ufeff") // a BOM some editors write
		}
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		if err := CheckSecret(line); err != nil {
			errs = append(errs, &LineError{Line: n, Err: err})
			continue
		}
		keys = append(keys, NewKey(fmt.Sprintf("key-%d", len(keys)+1), line))
	}
	if err := sc.Err(); err != nil {
		errs = append(errs, fmt.Errorf("after line %d: %w", n, err))
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return keys, nil
}
