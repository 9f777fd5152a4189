package h1

import (
	"net/textproto"

	"github.com/comfygate/comfygate/internal/httpsyntax"
)

// cleanValue reports whether a header value is visible ASCII, spaces and
// tabs only. obs-text (bytes from 0x80) is legal but rare: not served here.
func cleanValue(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; (c < ' ' && c != '\t') || c >= 0x7f {
			return false
		}
	}
	return true
}

// cleanTarget reports whether a request target is visible ASCII only.
func cleanTarget(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c <= ' ' || c >= 0x7f {
			return false
		}
	}
	return true
}

// validHost reports whether a Host value has only the bytes net/http
// accepts in one (golang.org/x/net/http/httpguts.ValidHostHeader).
func validHost(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c >= 0x80 || !hostChar[c] {
			return false
		}
	}
	return true
}

var hostChar = func() (t [128]bool) {
	for c := '0'; c <= '9'; c++ {
		t[c] = true
	}
	for c := 'a'; c <= 'z'; c++ {
		t[c] = true
		t[c-'a'+'A'] = true
	}
	for _, c := range "!$%&'()*+,-.:;=[]_~" {
		t[c] = true
	}
	return t
}()

// canonical returns the canonical form of a token header name. A name that
// is canonical already is returned as it is (no allocation).
func canonical(name string) string {
	upper := true
	for i := 0; i < len(name); i++ {
		c := name[i]
		if upper && 'a' <= c && c <= 'z' || !upper && 'A' <= c && c <= 'Z' {
			return textproto.CanonicalMIMEHeaderKey(name)
		}
		upper = c == '-'
	}
	return name
}

// parseLength parses a Content-Length value: decimal digits only.
func parseLength(s string) (int64, bool) {
	if len(s) == 0 || len(s) > 18 {
		return 0, false
	}
	var n int64
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c < '0' || c > '9' {
			return 0, false
		}
		n = n*10 + int64(c-'0')
	}
	return n, true
}

var (
	isToken   = httpsyntax.IsToken[string]
	trimOWS   = httpsyntax.TrimOWS[string]
	equalFold = httpsyntax.EqualFold
)
