package auth

import (
	"net/http"
	"net/url"
	"strings"

	"github.com/comfygate/comfygate/internal/session"
)

// Where a credential was found. These strings appear in logs and metrics.
const (
	SourceBearer = "bearer"      // Authorization: Bearer KEY
	SourceHeader = "x-api-key"   // X-API-Key: KEY
	SourceQuery  = "query"       // ?api_key=KEY
	SourceToken  = "query-token" // ?token=KEY (ComfyUI-Login clients)
)

// Query parameters that carry a key. "token" is what clients written for the
// ComfyUI-Login plugin send.
var queryKeyParams = [...]string{"api_key", "token"}

// A Credential is one key-like value found in a request. Value is empty when
// the credential was present but malformed (an unknown Authorization scheme,
// undecodable percent-encoding); such a credential never matches a key.
type Credential struct {
	Source string
	Value  string
}

// Credentials returns every credential r carries: each Authorization header
// with the Bearer scheme, each X-API-Key header, and each api_key or token
// query parameter.
//
// An Authorization header with another scheme (Basic, Digest, …) is not an
// API key and is ignored here: it may be meant for a proxy in front of
// comfygate, and ignoring it can never let a request in. Strip still
// removes it before the request goes upstream.
func Credentials(r *http.Request) []Credential { return AppendCredentials(nil, r) }

// AppendCredentials is Credentials appending to creds, so that a caller can
// pass a small array and not allocate for the usual one or two credentials.
func AppendCredentials(creds []Credential, r *http.Request) []Credential {
	for _, v := range r.Header.Values("Authorization") {
		if c, ok := parseAuthorization(v); ok {
			creds = append(creds, c)
		}
	}
	for _, v := range r.Header.Values("X-Api-Key") {
		creds = append(creds, Credential{Source: SourceHeader, Value: v})
	}
	if r.URL != nil && r.URL.RawQuery != "" {
		creds = appendQueryCredentials(creds, r.URL.RawQuery)
	}
	return creds
}

// parseAuthorization reads "Bearer KEY"; the scheme is case-insensitive
// (RFC 9110 section 11.1) and may be followed by several spaces. "Bearer"
// alone is a credential with an empty (never valid) value.
func parseAuthorization(v string) (Credential, bool) {
	v = strings.TrimSpace(v)
	scheme, rest, _ := strings.Cut(v, " ")
	if !strings.EqualFold(scheme, "Bearer") {
		return Credential{}, false
	}
	return Credential{Source: SourceBearer, Value: strings.TrimLeft(rest, " ")}, true
}

// appendQueryCredentials splits the query on '&' only, as ComfyUI's aiohttp
// does, and decodes each name before comparing, so "api%5Fkey" is caught too.
func appendQueryCredentials(creds []Credential, rawQuery string) []Credential {
	for rest := rawQuery; rest != ""; {
		var pair string
		pair, rest, _ = strings.Cut(rest, "&")
		src, ok := queryCredentialName(pair)
		if !ok {
			continue
		}
		_, rawVal, _ := strings.Cut(pair, "=")
		val, err := url.QueryUnescape(rawVal)
		if err != nil {
			val = ""
		}
		creds = append(creds, Credential{Source: src, Value: val})
	}
	return creds
}

// queryCredentialName reports whether the query pair's name is a key parameter.
func queryCredentialName(pair string) (source string, ok bool) {
	rawName, _, _ := strings.Cut(pair, "=")
	if rawName == "" {
		return "", false
	}
	name := rawName
	if strings.ContainsAny(rawName, "%+") {
		var err error
		if name, err = url.QueryUnescape(rawName); err != nil {
			return "", false
		}
	}
	switch name {
	case queryKeyParams[0]:
		return SourceQuery, true
	case queryKeyParams[1]:
		return SourceToken, true
	}
	return "", false
}

// hasQueryCredential is a cheap pre-check that avoids rebuilding queries
// that cannot hold a credential.
func hasQueryCredential(rawQuery string) bool {
	if rawQuery == "" {
		return false
	}
	return strings.Contains(rawQuery, "api") || strings.Contains(rawQuery, "token") ||
		strings.Contains(rawQuery, "%") || strings.Contains(rawQuery, "+")
}

// Strip removes every credential from r in place: the Authorization and
// X-API-Key headers and the api_key and token query parameters. The other
// query parameters keep their exact encoding and order. It is meant for the
// outbound copy of a request (httputil.ProxyRequest.Out), never for the
// request a handler was given.
func Strip(r *http.Request) {
	// The names are canonical already; delete skips Del's canonicalisation.
	delete(r.Header, "Authorization")
	delete(r.Header, "X-Api-Key")
	if values, ok := r.Header["Cookie"]; ok {
		if kept := StripCookies(values); len(kept) > 0 {
			r.Header["Cookie"] = kept
		} else {
			delete(r.Header, "Cookie")
		}
	}
	if values, ok := r.Header["Referer"]; ok {
		// A page opened as /?token=KEY sends that URL as the Referer of
		// everything it loads; ComfyUI would log it.
		for i, v := range values {
			values[i] = StripReferer(v)
		}
	}
	if r.URL != nil {
		r.URL.RawQuery = StripQuery(r.URL.RawQuery)
		if r.URL.RawQuery == "" {
			r.URL.ForceQuery = false
		}
	}
}

// StripReferer returns a Referer (or any URL) without the api_key and token
// parameters in its query; the rest is kept as it was.
func StripReferer(ref string) string {
	base, rest, ok := strings.Cut(ref, "?")
	if !ok {
		return ref
	}
	query, frag, hasFrag := strings.Cut(rest, "#")
	stripped := StripQuery(query)
	if stripped == query {
		return ref
	}
	out := base
	if stripped != "" {
		out += "?" + stripped
	}
	if hasFrag {
		out += "#" + frag
	}
	return out
}

// IsCredentialHeader reports whether the canonical header name carries a
// key: Authorization or X-Api-Key. Strip removes both.
func IsCredentialHeader(name string) bool {
	return name == "Authorization" || name == "X-Api-Key"
}

// StripQuery returns rawQuery without its api_key and token parameters; the
// other pairs keep their exact text and order. A query without credentials
// is returned as it is, without allocating.
func StripQuery(rawQuery string) string {
	if !hasQueryCredential(rawQuery) {
		return rawQuery
	}
	return dropCredentials(rawQuery)
}

// StripCookies returns the Cookie header values without comfygate's session
// cookie; every other cookie is kept as it was. Values without the session
// cookie are returned as they are, without allocating; nil means nothing is
// left.
func StripCookies(values []string) []string {
	found := false
	for _, v := range values {
		if strings.Contains(v, session.CookieName) {
			found = true
			break
		}
	}
	if !found {
		return values
	}
	var kept []string
	for _, v := range values {
		if !strings.Contains(v, session.CookieName) {
			kept = append(kept, v)
			continue
		}
		var parts []string
		for _, c := range strings.Split(v, ";") {
			name, _, _ := strings.Cut(strings.TrimSpace(c), "=")
			if name != session.CookieName {
				parts = append(parts, strings.TrimSpace(c))
			}
		}
		if len(parts) > 0 {
			kept = append(kept, strings.Join(parts, "; "))
		}
	}
	return kept
}

// RedactQuery returns rawQuery for logs: the value of every key parameter,
// and of any parameter whose name suggests a secret (key, token, secret,
// password, auth, …), is replaced by "REDACTED". A key sent under the wrong
// name is not a credential to the gateway, but it must not reach the logs.
func RedactQuery(rawQuery string) string {
	if rawQuery == "" {
		return rawQuery
	}
	// Split on ';' as well as '&': some servers treat ';' as a separator,
	// and a key after one must not reach the logs either.
	var b strings.Builder
	b.Grow(len(rawQuery))
	for rest := rawQuery; ; {
		i := strings.IndexAny(rest, "&;")
		pair := rest
		if i >= 0 {
			pair = rest[:i]
		}
		name, _, _ := strings.Cut(pair, "=")
		if _, isCred := queryCredentialName(pair); isCred || secretLooking(name) {
			b.WriteString(name + "=REDACTED")
		} else {
			b.WriteString(pair)
		}
		if i < 0 {
			return b.String()
		}
		b.WriteByte(rest[i])
		rest = rest[i+1:]
	}
}

// secretLooking reports whether a query parameter name suggests a secret.
func secretLooking(rawName string) bool {
	name, err := url.QueryUnescape(rawName)
	if err != nil {
		name = rawName
	}
	name = strings.ToLower(name)
	for _, w := range [...]string{"key", "token", "secret", "pass", "auth", "sig", "credential", "session"} {
		if strings.Contains(name, w) {
			return true
		}
	}
	return false
}

// dropCredentials rebuilds rawQuery without its credential pairs; the other
// pairs keep their exact text and order.
func dropCredentials(rawQuery string) string {
	var b strings.Builder
	b.Grow(len(rawQuery))
	first := true
	for pair := range strings.SplitSeq(rawQuery, "&") {
		if _, isCred := queryCredentialName(pair); isCred {
			continue
		}
		if !first {
			b.WriteByte('&')
		}
		b.WriteString(pair)
		first = false
	}
	return b.String()
}
