package requestlog

import (
	"io"
	"log/slog"
	"math"
	"net/netip"
	"strconv"
	"sync"
	"time"
	"unicode/utf8"
)

// NewJSONLogger returns a logger that writes JSON lines to w exactly as
// slog.New(slog.NewJSONHandler(w, opts)) would. The request middleware
// recognises it and writes its per-request line itself, byte for byte as
// slog would but without building a slog.Record, which is a noticeable share
// of the CPU a small request costs.
//
// The handler serialises every Write to w, so w need not be safe for
// concurrent use, and lines from the middleware and from ordinary slog calls
// never interleave.
func NewJSONLogger(w io.Writer, opts *slog.HandlerOptions) *slog.Logger {
	if opts == nil {
		opts = &slog.HandlerOptions{}
	}
	out := &lineWriter{w: w}
	return slog.New(&jsonHandler{
		JSONHandler: slog.NewJSONHandler(out, opts),
		out:         out,
		// The fast path knows only slog's default shape of a record.
		fast: opts.ReplaceAttr == nil && !opts.AddSource,
	})
}

// jsonHandler is the handler NewJSONLogger builds: slog's JSONHandler, whose
// methods it delegates, marked so that entry.finish can find it. WithAttrs
// and WithGroup return the plain JSONHandler's result, so the fast path
// applies only to the logger NewJSONLogger returned, which has no attributes
// or groups that the line would have to carry.
type jsonHandler struct {
	*slog.JSONHandler
	out  *lineWriter
	fast bool
}

// lineWriter serialises Writes to w. The JSONHandler writes through it (under
// its own mutex as well) and so does the fast path. Both write each line with
// exactly one Write call: slog's commonHandler.handle builds the whole record
// in a buffer and then calls w.Write once (log/slog/handler.go, Go 1.26), and
// jsonHandler.writeLine does the same. One lock around one Write per line is
// therefore enough to keep lines whole, whatever w is.
type lineWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (lw *lineWriter) Write(p []byte) (int, error) {
	lw.mu.Lock()
	defer lw.mu.Unlock()
	return lw.w.Write(p)
}

// linePool holds buffers for request lines. A buffer that grew past
// maxPooledLine (a very long path) is dropped, as slog drops its own.
var linePool = sync.Pool{New: func() any {
	b := make([]byte, 0, 512)
	return &b
}}

const maxPooledLine = 16 << 10

// writeLine writes l as the record (t, level, "request", l's attributes)
// and reports whether it did; if not, the caller logs l through slog. It
// does not check the level.
func (h *jsonHandler) writeLine(t time.Time, level slog.Level, l *line) bool {
	if !h.fast {
		return false
	}
	bp := linePool.Get().(*[]byte)
	b, ok := l.appendJSON((*bp)[:0], t, level)
	if ok {
		h.out.Write(b) // slog.Logger ignores Handle's error too
	}
	if cap(b) <= maxPooledLine {
		*bp = b[:0]
		linePool.Put(bp)
	}
	return ok
}

// line is what a request's log line says.
type line struct {
	method string
	path   string // as sent, escaped
	// query is the redacted query string; hasQuery says the request had
	// one (it may redact to "", and the path then still ends in "?").
	query       string
	hasQuery    bool
	status      int
	bytes       int64
	durationMS  float64
	client      netip.Addr
	key         string
	authFailure string
	bytesIn     int64 // logged for status 101 only
	aborted     bool
}

// attrs appends l's attributes, in the line's order, to a.
func (l *line) attrs(a []slog.Attr) []slog.Attr {
	path := l.path
	if l.hasQuery {
		path += "?" + l.query
	}
	a = append(a,
		slog.String("method", l.method),
		slog.String("path", path),
		slog.Int("status", l.status),
		slog.Int64("bytes", l.bytes),
		slog.Float64("duration_ms", l.durationMS),
		slog.String("client", l.client.String()),
	)
	if l.key != "" {
		a = append(a, slog.String("key", l.key))
	}
	if l.authFailure != "" {
		a = append(a, slog.String("auth_failure", l.authFailure))
	}
	if l.status == 101 {
		a = append(a, slog.Int64("bytes_in", l.bytesIn))
	}
	if l.aborted {
		a = append(a, slog.Bool("aborted", true))
	}
	return a
}

// appendJSON appends the line slog.JSONHandler (without options that change
// the record's shape) writes for the record (t, level, "request",
// l.attrs()). It reports false, for the caller to use slog, where slog would
// write an "!ERROR:" value: a time outside years 0-9999 or a duration that is
// not a finite number.
func (l *line) appendJSON(b []byte, t time.Time, level slog.Level) ([]byte, bool) {
	if y := t.Year(); y < 0 || y >= 10000 {
		return b, false
	}
	if math.IsNaN(l.durationMS) || math.IsInf(l.durationMS, 0) {
		return b, false
	}
	// slog's appendJSONTime: RFC 3339 with nanoseconds, trailing zeros
	// trimmed, in t's location.
	b = append(b, `{"time":"`...)
	b = t.AppendFormat(b, time.RFC3339Nano)
	b = append(b, `","level":`...)
	b = appendJSONString(b, level.String())
	b = append(b, `,"msg":"request","method":`...)
	b = appendJSONString(b, l.method)
	b = append(b, `,"path":"`...)
	// Escaping works byte by byte except inside a UTF-8 sequence, which '?'
	// cannot continue, so escaping the two halves is escaping the whole.
	b = appendEscapedJSON(b, l.path)
	if l.hasQuery {
		b = append(b, '?')
		b = appendEscapedJSON(b, l.query)
	}
	b = append(b, `","status":`...)
	b = strconv.AppendInt(b, int64(l.status), 10)
	b = append(b, `,"bytes":`...)
	b = strconv.AppendInt(b, l.bytes, 10)
	b = append(b, `,"duration_ms":`...)
	b = appendJSONFloat(b, l.durationMS)
	b = append(b, `,"client":`...)
	b = appendJSONAddr(b, l.client)
	if l.key != "" {
		b = append(b, `,"key":`...)
		b = appendJSONString(b, l.key)
	}
	if l.authFailure != "" {
		b = append(b, `,"auth_failure":`...)
		b = appendJSONString(b, l.authFailure)
	}
	if l.status == 101 {
		b = append(b, `,"bytes_in":`...)
		b = strconv.AppendInt(b, l.bytesIn, 10)
	}
	if l.aborted {
		b = append(b, `,"aborted":true`...)
	}
	return append(b, "}\n"...), true
}

// appendJSONAddr appends a as slog writes a.String(), without building
// the string when a's text needs no escaping.
func appendJSONAddr(b []byte, a netip.Addr) []byte {
	// An invalid address appends nothing but reads "invalid IP"; a zone
	// may hold any byte.
	if !a.IsValid() || a.Zone() != "" {
		return appendJSONString(b, a.String())
	}
	b = append(b, '"')
	b = a.AppendTo(b) // digits, hex letters, '.' and ':' only
	return append(b, '"')
}

// appendJSONFloat appends f as slog does: it encodes float64 values with
// encoding/json, which writes them as ECMAScript does (encode.go,
// floatEncoder). f must be finite.
func appendJSONFloat(b []byte, f float64) []byte {
	format := byte('f')
	if abs := math.Abs(f); abs != 0 && (abs < 1e-6 || abs >= 1e21) {
		format = 'e'
	}
	b = strconv.AppendFloat(b, f, format, -1, 64)
	if format == 'e' {
		// 1e-07, not 1e-7.
		if n := len(b); n >= 4 && b[n-4] == 'e' && b[n-3] == '-' && b[n-2] == '0' {
			b[n-2] = b[n-1]
			b = b[:n-1]
		}
	}
	return b
}

// appendJSONString appends s quoted and escaped as slog does.
func appendJSONString(b []byte, s string) []byte {
	b = append(b, '"')
	b = appendEscapedJSON(b, s)
	return append(b, '"')
}

const hexDigits = "0123456789abcdef"

// jsonPlain holds the bytes appendEscapedJSON copies as they are without a
// further look: ASCII from ' ' up, but for '"' and '\\'.
var jsonPlain = func() (t [256]bool) {
	for c := ' '; c < utf8.RuneSelf; c++ {
		t[c] = c != '"' && c != '\\'
	}
	return t
}()

// appendEscapedJSON appends s escaped by the rules of slog's
// appendEscapedJSONString (json_handler.go): '"' and '\\' get a backslash;
// \n, \r and \t their short escapes; other bytes below 0x20 \u00XX; invalid
// UTF-8, byte by byte, \ufffd; U+2028 and U+2029 \u2028 and \u2029.
// Everything else, '<', '>', '&' and DEL included, is copied.
func appendEscapedJSON(b []byte, s string) []byte {
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if jsonPlain[c] {
			i++
			continue
		}
		if c < utf8.RuneSelf {
			b = append(b, s[start:i]...)
			switch c {
			case '"', '\\':
				b = append(b, '\\', c)
			case '\n':
				b = append(b, '\\', 'n')
			case '\r':
				b = append(b, '\\', 'r')
			case '\t':
				b = append(b, '\\', 't')
			default:
				b = append(b, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == utf8.RuneError && size == 1:
			b = append(b, s[start:i]...)
			b = append(b, `\ufffd`...)
		case r == '\u2028' || r == '\u2029':
			b = append(b, s[start:i]...)
			b = append(b, '\\', 'u', '2', '0', '2', hexDigits[r&0xf])
		default:
			i += size
			continue
		}
		i += size
		start = i
	}
	return append(b, s[start:]...)
}
