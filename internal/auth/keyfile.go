package auth

import (
	"bufio"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/comfygate/comfygate/internal/route"
)

// The key file holds one key per line. Blank lines and lines starting with
// '#' are ignored, and surrounding whitespace is trimmed, so `echo KEY > file`
// works. A line is one of
//
//	KEY                        a key, named key-N (N counts keys in the file)
//	NAME:KEY [SCOPES]          a named key
//	NAME:sha256:HEX [SCOPES]   a named key stored only as its SHA-256
//
// SCOPES is read, submit or admin (or a comma-separated list, of which the
// widest counts). A key without scopes is admin, so files written before
// scopes existed keep working. Names are letters, digits, '.', '_' and '-',
// at most 64 characters, and unique in the file.
//
// A line containing ':' is always read as NAME:..., so a bare key must not
// contain ':' (generated keys never do). A line that fits none of the forms
// gets an error saying what it was read as (in words and counts: no word of
// it is quoted, since any of them may be part of a key) and which forms
// exist.

const maxNameLen = 64

// KeyLine is the key-file line for a named, hashed key.
func KeyLine(name, secret string, scope route.Scope) string {
	return fmt.Sprintf("%s:sha256:%s %s", name, HashSecret(secret), scope)
}

// NewSecret returns a fresh random key: "cg_" and 43 URL-safe characters
// (256 bits). The prefix makes leaked keys easy for secret scanners to spot.
func NewSecret() string {
	b := make([]byte, 32)
	rand.Read(b) // never fails (crypto/rand)
	return "cg_" + base64.RawURLEncoding.EncodeToString(b)
}

// CheckName reports why name cannot name a key, or nil.
func CheckName(name string) error {
	if name == "" {
		return errors.New("key name is empty")
	}
	if len(name) > maxNameLen {
		return fmt.Errorf("key name is longer than %d characters", maxNameLen)
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '.' || c == '_' || c == '-') {
			return errors.New("key name may only hold letters, digits, '.', '_' and '-'")
		}
	}
	return nil
}

// ParseScopes reads a scope list such as "read" or "read,submit"; the widest counts.
func ParseScopes(s string) (route.Scope, error) {
	widest := route.ScopeNone
	for _, f := range strings.FieldsFunc(s, func(r rune) bool { return r == ',' || r == ' ' || r == '\t' }) {
		sc, err := route.ParseScope(f)
		if err != nil {
			return 0, err
		}
		widest = max(widest, sc)
	}
	if widest == route.ScopeNone {
		return 0, errors.New("no scope given")
	}
	return widest, nil
}

// LineError is a problem with one line of a key file.
type LineError struct {
	Line int
	Err  error
}

func (e *LineError) Error() string { return fmt.Sprintf("line %d: %v", e.Line, e.Err) }
func (e *LineError) Unwrap() error { return e.Err }

// ParseKeyFile reads a key file (format above). It reports every bad line
// at once, as LineErrors joined with errors.Join, and never includes a key's
// text in an error.
func ParseKeyFile(r io.Reader) ([]Key, error) {
	var (
		keys  []Key
		errs  []error
		names = map[string]int{}
		ids   = map[KeyID]int{}
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
		k, err := parseLine(line, len(keys)+1)
		if err == nil {
			if prev, dup := names[k.Name]; dup {
				err = fmt.Errorf("key name %q is already used on line %d", k.Name, prev)
			} else if prev, dup := ids[k.id]; dup {
				err = fmt.Errorf("the same key is already on line %d", prev)
			}
		}
		if err != nil {
			errs = append(errs, &LineError{Line: n, Err: err})
			continue
		}
		names[k.Name], ids[k.id] = n, n
		keys = append(keys, k)
	}
	if err := sc.Err(); err != nil {
		errs = append(errs, fmt.Errorf("after line %d: %w", n, err))
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return keys, nil
}

// parseLine reads one non-blank, non-comment line; index names an unnamed key.
func parseLine(line string, index int) (Key, error) {
	field, scopes, hasScopes := line, "", false
	if i := strings.IndexAny(line, " \t"); i >= 0 {
		field, scopes, hasScopes = line[:i], line[i+1:], true
	}
	scope := route.ScopeAdmin
	if hasScopes {
		s, err := ParseScopes(scopes)
		if err != nil {
			return Key{}, shapeError(field, scopes)
		}
		scope = s
	}
	name, rest, named := strings.Cut(field, ":")
	if !named {
		if err := CheckSecret(field); err != nil {
			return Key{}, err
		}
		k := NewKey(fmt.Sprintf("key-%d", index), field)
		k.Scope = scope
		return k, nil
	}
	if err := CheckName(name); err != nil {
		return Key{}, err
	}
	if name == "sha256" && isHex64(rest) {
		// "sha256:HEX" alone would otherwise be a key named sha256 whose
		// secret is the hex text: the hash itself would be the key.
		return Key{}, errors.New("a hashed key needs a name: write NAME:sha256:HEX (" + lineForms + ")")
	}
	if hexHash, hashed := strings.CutPrefix(rest, "sha256:"); hashed {
		b, err := hex.DecodeString(hexHash)
		if err != nil || len(b) != len(KeyID{}) {
			return Key{}, fmt.Errorf("key %q: sha256: must be followed by 64 hex digits", name)
		}
		k := Key{Name: name, Scope: scope}
		copy(k.id[:], b)
		return k, nil
	}
	if err := CheckSecret(rest); err != nil {
		return Key{}, fmt.Errorf("key %q: %w", name, err)
	}
	k := NewKey(name, rest)
	k.Scope = scope
	return k, nil
}

// lineForms lists the line forms, for errors about a line's shape.
const lineForms = "a line is KEY, NAME:KEY or NAME:sha256:HEX, optionally followed by read, submit or admin"

// shapeError explains a line whose words after the first are not scopes. It
// describes the line by the form its first word was read as and by word
// counts: any word may be key material, so none is quoted, except a header
// word (Bearer) or a name that passed CheckName, which are not secrets.
func shapeError(first, after string) error {
	words := strings.FieldsFunc(after, func(r rune) bool { return r == ',' || r == ' ' || r == '\t' })
	bad := 0 // 1-based position among the words after the first
	for i, w := range words {
		if _, err := route.ParseScope(w); err != nil {
			bad = i + 1
			break
		}
	}
	switch {
	case strings.EqualFold(first, "Bearer") || strings.EqualFold(first, "Authorization:") || strings.EqualFold(first, "X-API-Key:"):
		return fmt.Errorf("the line starts with %q, as an HTTP header does: write the key alone, without %q (%s)", first, first+" ", lineForms)
	case strings.HasSuffix(first, ":") && strings.Count(first, ":") == 1 && CheckName(strings.TrimSuffix(first, ":")) == nil:
		name := strings.TrimSuffix(first, ":")
		return fmt.Errorf("read as the name %q with nothing after the colon, then %s: remove the space after the colon (%s:KEY; %s)", name, countWords(len(words)), name, lineForms)
	case len(words) > 0 && strings.HasPrefix(words[0], ":"):
		return fmt.Errorf("read as %s, then %s starting with ':': remove the space before the colon (NAME:KEY; %s)", readAs(first), countWords(len(words)), lineForms)
	}
	msg := fmt.Sprintf("unknown scope (want read, submit or admin): read as %s, then %s", readAs(first), countWords(len(words)))
	if len(words) > 1 {
		msg += fmt.Sprintf(", and word %d of them is not a scope", bad)
	} else {
		msg += " that is not a scope"
	}
	return fmt.Errorf("%s (a key cannot contain spaces; %s)", msg, lineForms)
}

// readAs names the form the first word of a line was read as, quoting only a
// valid name.
func readAs(first string) string {
	name, rest, named := strings.Cut(first, ":")
	switch {
	case !named:
		return "KEY"
	case CheckName(name) != nil:
		return "NAME:KEY with an invalid NAME"
	case strings.HasPrefix(rest, "sha256:"):
		return fmt.Sprintf("%s:sha256:HEX", name)
	default:
		return fmt.Sprintf("%s:KEY", name)
	}
}

func countWords(n int) string {
	if n == 1 {
		return "1 more word"
	}
	return fmt.Sprintf("%d more words", n)
}

func isHex64(s string) bool {
	b, err := hex.DecodeString(s)
	return err == nil && len(b) == len(KeyID{})
}
