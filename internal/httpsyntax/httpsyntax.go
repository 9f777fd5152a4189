// Package httpsyntax holds the few HTTP/1.1 grammar checks that both of
// comfygate's hand-written parsers use: internal/h1 on requests from
// clients and internal/proxy on answers from ComfyUI. They must agree
// exactly, so they live in one place.
package httpsyntax

import "strings"

// IsToken reports whether s is a non-empty RFC 9110 token (a header name,
// a method).
func IsToken[T ~string | ~[]byte](s T) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c >= 0x80 || !tokenChar[c] {
			return false
		}
	}
	return len(s) > 0
}

var tokenChar = func() (t [128]bool) {
	for c := '0'; c <= '9'; c++ {
		t[c] = true
	}
	for c := 'a'; c <= 'z'; c++ {
		t[c] = true
		t[c-'a'+'A'] = true
	}
	for _, c := range "!#$%&'*+-.^_`|~" {
		t[c] = true
	}
	return t
}()

// TrimOWS removes optional whitespace (spaces and tabs) around s.
func TrimOWS[T ~string | ~[]byte](s T) T {
	for len(s) > 0 && (s[0] == ' ' || s[0] == '\t') {
		s = s[1:]
	}
	for len(s) > 0 && (s[len(s)-1] == ' ' || s[len(s)-1] == '\t') {
		s = s[:len(s)-1]
	}
	return s
}

// EqualFold reports whether a and b are equal ignoring ASCII case (header
// tokens such as "close" or "chunked"; no Unicode folding).
func EqualFold(a, b string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := 0; i < len(a); i++ {
		x, y := a[i], b[i]
		if 'A' <= x && x <= 'Z' {
			x += 'a' - 'A'
		}
		if 'A' <= y && y <= 'Z' {
			y += 'a' - 'A'
		}
		if x != y {
			return false
		}
	}
	return true
}

// ListHas reports whether the comma-separated header list (a Connection or
// TE value) names token, ignoring case and optional whitespace.
func ListHas(list, token string) bool {
	for list != "" {
		var item string
		item, list, _ = strings.Cut(list, ",")
		if EqualFold(TrimOWS(item), token) {
			return true
		}
	}
	return false
}
