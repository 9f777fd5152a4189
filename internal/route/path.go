package route

import (
	"path"
	"strings"
)

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

// canonicalPath decodes escapedPath and reports whether it is in the plain
// form that every router reads the same way.
//
// With forScope, an encoded '%' and encoded non-ASCII bytes (UTF-8 file
// names) are accepted too: decoded, they cannot form a separator or a dot
// segment, so they cannot move a path to another route. Public/protected
// decisions stay strict; only the scope and label of a request use this.
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

// isStaticAsset reports whether the canonical path p names a file of the
// web UI: one with a static type under a static directory, or at the root.
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
