package auth

import (
	"net/http"
	"path"
	"strings"
)

// Access is what a request needs to pass the gateway.
type Access int

const (
	// Protected requests need a valid key.
	Protected Access = iota
	// Public requests pass without a key: the web UI page and its static
	// assets, and the WebSocket unless ProtectWS is set.
	Public
	// Preflight is a CORS preflight (OPTIONS with Access-Control-Request-Method).
	// Browsers never attach credentials to it, and ComfyUI answers every
	// OPTIONS with an empty 200 before any handler runs, so it passes.
	Preflight
)

func (a Access) String() string {
	switch a {
	case Public:
		return "public"
	case Preflight:
		return "preflight"
	}
	return "protected"
}

// Directories of the ComfyUI frontend's static files. ComfyUI serves these
// from its static routes; none of them is an API route.
var staticPrefixes = [...]string{
	"/assets/",     // the bundled frontend (comfyui-frontend-package)
	"/extensions/", // core and custom-node web directories
	"/scripts/",    // compatibility shims for old extensions
	"/fonts/",
	"/cursor/",
	"/templates/", // workflow templates (comfyui-workflow-templates)
	"/docs/",      // embedded node docs (comfyui-embedded-docs)
}

// File types a static asset may have. A path outside staticPrefixes is
// public only if it is a single segment at the root with one of these
// extensions (such as /favicon.ico); "any path ending in .json" is never
// enough, which is what keeps /userdata/*.json behind the key.
var staticExts = map[string]bool{
	".js": true, ".mjs": true, ".css": true, ".map": true, ".html": true,
	".json": true, ".txt": true, ".md": true, ".wasm": true,
	".png": true, ".jpg": true, ".jpeg": true, ".gif": true, ".svg": true,
	".webp": true, ".avif": true, ".ico": true, ".webmanifest": true,
	".woff": true, ".woff2": true, ".ttf": true, ".otf": true, ".eot": true,
	".mp3": true, ".mp4": true, ".webm": true, ".glb": true,
}

// rootExts are the static types allowed for a root-level file.
var rootExts = map[string]bool{
	".js": true, ".css": true, ".map": true, ".html": true, ".ico": true,
	".png": true, ".svg": true, ".webmanifest": true, ".txt": true,
}

// Classify decides what r needs. escapedPath must be the path exactly as the
// client sent it (r.URL.EscapedPath()).
//
// A request is public only if it is a GET or HEAD whose path is in plain
// canonical form and names the UI page, a static asset or the WebSocket. Any
// path ComfyUI might read differently from us (dot segments, empty segments,
// encoded '/', '\\', '.' or '%', backslashes, control characters) is
// protected, so a trick can at most make a public request need a key, never
// the reverse.
func Classify(method, escapedPath string, h http.Header, protectWS bool) Access {
	if method == http.MethodOptions && h.Get("Access-Control-Request-Method") != "" {
		return Preflight
	}
	if method != http.MethodGet && method != http.MethodHead {
		return Protected
	}
	p, ok := canonicalPath(escapedPath, false)
	if !ok {
		return Protected
	}
	switch p {
	case "/":
		return Public
	case "/ws", "/api/ws":
		if protectWS {
			return Protected
		}
		return Public
	}
	if isStaticAsset(p) {
		return Public
	}
	return Protected
}

// canonicalPath decodes escapedPath and reports whether it is in the plain
// form that every router reads the same way.
//
// With forScope, an encoded '%' and encoded non-ASCII bytes (UTF-8 file
// names) are accepted too: decoded, they cannot form a separator or a dot
// segment, so they cannot move a path to another route. Public/protected
// decisions stay strict; only the scope check of a request that already
// has a valid key uses this.
func canonicalPath(escapedPath string, forScope bool) (string, bool) {
	if escapedPath == "" || escapedPath[0] != '/' {
		return "", false
	}
	for i := 0; i < len(escapedPath); i++ {
		c := escapedPath[i]
		if c <= 0x20 || c == 0x7f || c == '\\' || c == ';' || c >= 0x80 {
			return "", false
		}
		if c == '%' {
			if i+2 >= len(escapedPath) {
				return "", false
			}
			d, ok := unhex2(escapedPath[i+1], escapedPath[i+2])
			// Encoded separators, dots, '%' and anything non-printable are
			// where routers disagree; refuse them.
			if forScope && ok && (d == '%' || d >= 0x80) {
				continue
			}
			if !ok || d == '/' || d == '\\' || d == '.' || d == '%' || d == ';' || d < 0x20 || d >= 0x7f {
				return "", false
			}
		}
	}
	p := escapedPath
	if strings.Contains(p, "%") {
		var b strings.Builder
		for i := 0; i < len(p); i++ {
			if p[i] == '%' {
				d, _ := unhex2(p[i+1], p[i+2])
				b.WriteByte(d)
				i += 2
				continue
			}
			b.WriteByte(p[i])
		}
		p = b.String()
	}
	if p != "/" && path.Clean(p) != strings.TrimSuffix(p, "/") {
		return "", false // dot or empty segments
	}
	if strings.HasSuffix(p, "/") && p != "/" {
		return "", false
	}
	return p, true
}

func isStaticAsset(p string) bool {
	ext := path.Ext(p)
	if ext == "" {
		return false
	}
	ext = strings.ToLower(ext)
	for _, prefix := range staticPrefixes {
		if strings.HasPrefix(p, prefix) {
			return staticExts[ext]
		}
	}
	// A root-level file such as /favicon.ico.
	return strings.LastIndexByte(p, '/') == 0 && rootExts[ext]
}

func unhex2(a, b byte) (byte, bool) {
	x, ok1 := unhex(a)
	y, ok2 := unhex(b)
	return x<<4 | y, ok1 && ok2
}

func unhex(c byte) (byte, bool) {
	switch {
	case '0' <= c && c <= '9':
		return c - '0', true
	case 'a' <= c && c <= 'f':
		return c - 'a' + 10, true
	case 'A' <= c && c <= 'F':
		return c - 'A' + 10, true
	}
	return 0, false
}
