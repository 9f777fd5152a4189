package requestlog

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"math"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// slogLine is the line slog's JSONHandler writes for l: the reference the
// fast path must match byte for byte.
func slogLine(t testing.TB, tm time.Time, level slog.Level, l *line) string {
	t.Helper()
	var buf bytes.Buffer
	r := slog.NewRecord(tm, level, "request", 0)
	r.AddAttrs(l.attrs(nil)...)
	if err := slog.NewJSONHandler(&buf, nil).Handle(context.Background(), r); err != nil {
		t.Fatal(err)
	}
	return buf.String()
}

// fastLine is the line the fast path writes for l through a NewJSONLogger
// logger, and whether it wrote one.
func fastLine(tm time.Time, level slog.Level, l *line) (string, bool) {
	var buf bytes.Buffer
	h := NewJSONLogger(&buf, nil).Handler().(*jsonHandler)
	ok := h.writeLine(tm, level, l)
	return buf.String(), ok
}

func TestRequestLineMatchesSlog(t *testing.T) {
	base := line{method: "GET", path: "/api/queue", status: 200, bytes: 1234, durationMS: 1.234,
		client: netip.MustParseAddr("127.0.0.1")}
	with := func(f func(l *line)) line {
		l := base
		f(&l)
		return l
	}
	odd := "ci \"key\"\\ <b>&amp; \u2028\u2029 \xff\xe2\x80 \x00\x1f\x7f \t\r\n é😀"
	lines := map[string]line{
		"plain":               base,
		"zero":                {},
		"query":               with(func(l *line) { l.path, l.query, l.hasQuery = "/api/view", "filename=a.png&type=output", true }),
		"query redacted away": with(func(l *line) { l.hasQuery = true }),
		"quotes backslashes":  with(func(l *line) { l.path = `/a"b\c\\"` }),
		"control":             with(func(l *line) { l.path = "/\x00\x01\x08\x0b\x0c\x1b\x1f\x7f\n\r\t" }),
		"html":                with(func(l *line) { l.path, l.query, l.hasQuery = "/<script>&amp;</script>", "a=<>&", true }),
		"separators":          with(func(l *line) { l.path = "/a\u2028b\u2029c\u2027\u202a" }),
		"invalid utf8":        with(func(l *line) { l.path = "/\xff\xfe\xc0\xaf\xed\xa0\x80\xf4\x90\x80\x80" }),
		// A truncated sequence before the '?' that joins path and query.
		"truncated before query": with(func(l *line) { l.path, l.query, l.hasQuery = "/a\xe2\x80", "\x80\x80b", true }),
		"replacement char":       with(func(l *line) { l.path = "/\uFFFD" }),
		"non-ASCII":              with(func(l *line) { l.path = "/über/日本語/😀/%C3%BC" }),
		"long":                   with(func(l *line) { l.path = strings.Repeat("/abc\"\u2028", 4000) }),
		"odd method":             with(func(l *line) { l.method = "M\"\x00\xff" }),
		"key":                    with(func(l *line) { l.key = "ci" }),
		"odd key":                with(func(l *line) { l.key = odd }),
		"auth failure":           with(func(l *line) { l.authFailure = "invalid" }),
		"odd auth failure":       with(func(l *line) { l.authFailure = odd }),
		"websocket":              with(func(l *line) { l.status, l.bytesIn, l.bytes = 101, 4096, 77 }),
		"websocket no bytes":     with(func(l *line) { l.status = 101 }),
		"aborted":                with(func(l *line) { l.status, l.aborted = 502, true }),
		"all": with(func(l *line) {
			l.path, l.query, l.hasQuery = "/ws", "clientId=x&token=REDACTED", true
			l.status, l.bytesIn, l.key, l.authFailure, l.aborted = 101, 9, "k", "scope", true
		}),
		"negative":          with(func(l *line) { l.status, l.bytes, l.bytesIn = -1, -5, -7 }),
		"max":               with(func(l *line) { l.status, l.bytes, l.bytesIn = math.MaxInt, math.MaxInt64, math.MinInt64 }),
		"duration 0":        with(func(l *line) { l.durationMS = 0 }),
		"duration -0":       with(func(l *line) { l.durationMS = math.Copysign(0, -1) }),
		"duration µs":       with(func(l *line) { l.durationMS = 0.001 }),
		"duration whole":    with(func(l *line) { l.durationMS = 1000 }),
		"duration long":     with(func(l *line) { l.durationMS = float64(math.MaxInt64/1000) / 1000 }),
		"duration odd":      with(func(l *line) { l.durationMS = 123456.789 }),
		"duration neg":      with(func(l *line) { l.durationMS = -0.5 }),
		"duration tiny":     with(func(l *line) { l.durationMS = 1e-7 }),
		"duration tiny 2":   with(func(l *line) { l.durationMS = 1.5e-300 }),
		"duration 1e21":     with(func(l *line) { l.durationMS = 1e21 }),
		"duration big":      with(func(l *line) { l.durationMS = -1.5e300 }),
		"duration max":      with(func(l *line) { l.durationMS = math.MaxFloat64 }),
		"duration sub 1e21": with(func(l *line) { l.durationMS = 999999999999999900000 }),
		"client invalid":    with(func(l *line) { l.client = netip.Addr{} }),
		"client v6":         with(func(l *line) { l.client = netip.MustParseAddr("2001:db8::1") }),
		"client mapped":     with(func(l *line) { l.client = netip.MustParseAddr("::ffff:10.0.0.1") }),
		"client zone":       with(func(l *line) { l.client = netip.MustParseAddr("fe80::1%eth0") }),
		"client odd zone":   with(func(l *line) { l.client = netip.MustParseAddr("fe80::1").WithZone(odd) }),
	}
	times := map[string]time.Time{
		"UTC":          time.Date(2026, 11, 20, 13, 4, 5, 0, time.UTC),
		"zone nanos":   time.Date(2026, 1, 2, 3, 4, 5, 123456789, time.FixedZone("IST", 5*3600+30*60)),
		"zone west":    time.Date(1999, 12, 31, 23, 59, 59, 120000000, time.FixedZone("", -(3*3600+30*60))),
		"local now":    time.Now(),
		"year 0":       time.Date(0, 1, 1, 0, 0, 0, 1, time.UTC),
		"year 9999":    time.Date(9999, 12, 31, 23, 59, 59, 999999999, time.UTC),
		"zero seconds": time.Date(2026, 6, 1, 0, 0, 0, 0, time.Local),
	}
	for ln, l := range lines {
		for tn, tm := range times {
			t.Run(ln+"/"+tn, func(t *testing.T) {
				level := slog.LevelInfo
				if l.aborted {
					level = slog.LevelWarn
				}
				want := slogLine(t, tm, level, &l)
				got, ok := fastLine(tm, level, &l)
				if !ok {
					t.Fatalf("fast path declined; slog writes %q", want)
				}
				if diff := cmp.Diff(want, got); diff != "" {
					t.Errorf("line differs from slog's (-slog +fast):\n%s", diff)
				}
				if !json.Valid([]byte(got)) {
					t.Errorf("invalid JSON: %q", got)
				}
			})
		}
	}
}

// Where slog writes an "!ERROR:" value, the fast path declines and
// entry.finish falls back to slog.
func TestRequestLineDeclines(t *testing.T) {
	ok := line{method: "GET", path: "/", status: 200}
	for name, c := range map[string]struct {
		t time.Time
		l line
	}{
		"year 10000":   {time.Date(10000, 1, 1, 0, 0, 0, 0, time.UTC), ok},
		"year -1":      {time.Date(-1, 1, 1, 0, 0, 0, 0, time.UTC), ok},
		"duration NaN": {time.Now(), line{durationMS: math.NaN()}},
		"duration Inf": {time.Now(), line{durationMS: math.Inf(-1)}},
	} {
		if got, ok := fastLine(c.t, slog.LevelInfo, &c.l); ok || got != "" {
			t.Errorf("%s: fast path wrote %q; want it to decline", name, got)
		}
	}
}

// mask hides what differs between two runs of the same request: the time
// and the duration.
var maskRE = regexp.MustCompile(`"time":"[^"]*"|"duration_ms":[^,]*`)

func mask(s string) string {
	return maskRE.ReplaceAllStringFunc(s, func(m string) string { return m[:strings.IndexByte(m, ':')] + ":X" })
}

// serve sends r through the Middleware on logger and returns what it
// logged. A handler that panics is recovered here.
func serve(logger *slog.Logger, client netip.Addr, h http.HandlerFunc, r *http.Request) {
	mw := Middleware(logger, func(q string) string { return strings.ReplaceAll(q, "secret", "REDACTED") },
		func(*http.Request) netip.Addr { return client }, nil)
	defer func() { recover() }()
	mw(h).ServeHTTP(httptest.NewRecorder(), r)
}

func TestMiddlewareFastPathMatchesSlog(t *testing.T) {
	for _, c := range []struct {
		name   string
		client netip.Addr
		target string
		h      http.HandlerFunc
	}{
		{"plain", netip.MustParseAddr("192.0.2.1"), "/api/queue", func(w http.ResponseWriter, r *http.Request) {
			w.Write([]byte("{}"))
		}},
		{"query and key", netip.MustParseAddr("2001:db8::2"), "/api/view?filename=a%22b.png&token=secret&x", func(w http.ResponseWriter, r *http.Request) {
			ScopeFrom(r.Context()).KeyName = "ci \"bot\" \u2028"
			w.WriteHeader(http.StatusNotFound)
		}},
		{"empty query", netip.Addr{}, "/a%2e%2e/%ff?", func(w http.ResponseWriter, r *http.Request) {}},
		{"refused", netip.MustParseAddr("198.51.100.7"), "/prompt", func(w http.ResponseWriter, r *http.Request) {
			ScopeFrom(r.Context()).AuthFailure = "invalid"
			http.Error(w, "no", http.StatusUnauthorized)
		}},
		{"aborted", netip.MustParseAddr("192.0.2.1"), "/view?filename=x", func(w http.ResponseWriter, r *http.Request) {
			ScopeFrom(r.Context()).KeyName = "k"
			w.Write([]byte("partial"))
			panic(http.ErrAbortHandler)
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			var fast, slow bytes.Buffer
			serve(NewJSONLogger(&fast, nil), c.client, c.h, httptest.NewRequest("GET", c.target, nil))
			serve(slog.New(slog.NewJSONHandler(&slow, nil)), c.client, c.h, httptest.NewRequest("GET", c.target, nil))
			if fast.Len() == 0 {
				t.Fatal("nothing logged")
			}
			if diff := cmp.Diff(mask(slow.String()), mask(fast.String())); diff != "" {
				t.Errorf("line differs from slog's (-slog +fast):\n%s", diff)
			}
		})
	}
}

// The level is honoured as slog honours it: a Warn logger writes no
// ordinary request lines but writes aborted ones, as WARN.
func TestRequestLineLevel(t *testing.T) {
	ok := func(w http.ResponseWriter, r *http.Request) {}
	abort := func(w http.ResponseWriter, r *http.Request) { panic(http.ErrAbortHandler) }
	client := netip.MustParseAddr("192.0.2.1")
	for _, level := range []slog.Level{slog.LevelDebug, slog.LevelInfo, slog.LevelWarn, slog.LevelError} {
		var lv slog.LevelVar
		lv.Set(level)
		for _, h := range []http.HandlerFunc{ok, abort} {
			var fast, slow bytes.Buffer
			serve(NewJSONLogger(&fast, &slog.HandlerOptions{Level: &lv}), client, h, httptest.NewRequest("GET", "/x", nil))
			serve(slog.New(slog.NewJSONHandler(&slow, &slog.HandlerOptions{Level: &lv})), client, h, httptest.NewRequest("GET", "/x", nil))
			if diff := cmp.Diff(mask(slow.String()), mask(fast.String())); diff != "" {
				t.Errorf("level %v: line differs from slog's (-slog +fast):\n%s", level, diff)
			}
		}
	}

	var out bytes.Buffer
	logger := NewJSONLogger(&out, &slog.HandlerOptions{Level: slog.LevelWarn})
	serve(logger, client, ok, httptest.NewRequest("GET", "/x", nil))
	if out.Len() != 0 {
		t.Fatalf("Warn logger wrote a request line: %q", out.String())
	}
	serve(logger, client, abort, httptest.NewRequest("GET", "/x", nil))
	if got := out.String(); !strings.Contains(got, `"level":"WARN","msg":"request"`) || !strings.HasSuffix(got, `,"aborted":true}`+"\n") {
		t.Errorf("aborted line = %q; want a WARN line with aborted", got)
	}
}

// A logger derived with With or WithGroup, or built with options that change
// a record's shape, logs requests through slog, so the line keeps them.
func TestRequestLineSlowPaths(t *testing.T) {
	client := netip.MustParseAddr("192.0.2.1")
	h := func(w http.ResponseWriter, r *http.Request) {}
	dropTime := func(groups []string, a slog.Attr) slog.Attr {
		if a.Key == slog.TimeKey || a.Key == "duration_ms" {
			return slog.Attr{}
		}
		return a
	}
	for name, derive := range map[string]func(w io.Writer, o *slog.HandlerOptions) *slog.Logger{
		"plain": func(w io.Writer, o *slog.HandlerOptions) *slog.Logger { return NewJSONLogger(w, o) },
		"With": func(w io.Writer, o *slog.HandlerOptions) *slog.Logger {
			return NewJSONLogger(w, o).With("component", "gateway")
		},
		"WithGroup": func(w io.Writer, o *slog.HandlerOptions) *slog.Logger {
			return NewJSONLogger(w, o).WithGroup("http")
		},
	} {
		for optName, opts := range map[string]*slog.HandlerOptions{
			"nil":         nil,
			"ReplaceAttr": {ReplaceAttr: dropTime},
			"AddSource":   {AddSource: true},
		} {
			t.Run(name+"/"+optName, func(t *testing.T) {
				var fast, slow bytes.Buffer
				serve(derive(&fast, opts), client, h, httptest.NewRequest("GET", "/x?y", nil))
				slowLogger := slog.New(slog.NewJSONHandler(&slow, opts))
				switch name {
				case "With":
					slowLogger = slowLogger.With("component", "gateway")
				case "WithGroup":
					slowLogger = slowLogger.WithGroup("http")
				}
				serve(slowLogger, client, h, httptest.NewRequest("GET", "/x?y", nil))
				got, want := mask(fast.String()), mask(slow.String())
				if optName == "AddSource" {
					// The source is the line that calls LogAttrs, the
					// same for both, as long as both use slog.
					if !strings.Contains(got, `"source":{`) {
						t.Errorf("no source in %q", got)
					}
				}
				if diff := cmp.Diff(want, got); diff != "" {
					t.Errorf("line differs from slog's (-slog +fast):\n%s", diff)
				}
			})
		}
	}
}

// A NewJSONLogger logger is slog's JSON logger for everything but request
// lines.
func TestNewJSONLoggerLikeSlog(t *testing.T) {
	tm := time.Date(2026, 11, 20, 13, 4, 5, 6000, time.FixedZone("", 3600))
	use := func(h slog.Handler) {
		ctx := context.Background()
		r := slog.NewRecord(tm, slog.LevelInfo, "hello \"you\"", 0)
		r.AddAttrs(slog.String("a", "<b>\u2028"), slog.Int("n", 3), slog.Float64("f", 1e-9), slog.Any("err", io.EOF),
			slog.Group("g", slog.Bool("ok", true)), slog.Duration("d", time.Second), slog.Time("t", tm))
		for _, h := range []slog.Handler{
			h,
			h.WithAttrs([]slog.Attr{slog.String("component", "x")}),
			h.WithGroup("grp"),
			h.WithGroup("grp").WithAttrs([]slog.Attr{slog.Int("i", 1)}).WithGroup("inner"),
		} {
			for _, level := range []slog.Level{slog.LevelDebug, slog.LevelInfo, slog.LevelError + 2} {
				if h.Enabled(ctx, level) {
					r.Level = level
					h.Handle(ctx, r)
				}
			}
		}
		// Through a Logger, whose times differ (masked).
		l := slog.New(h)
		l.Info("plain", "k", "v", "n", 1)
		l.With("w", 1).Warn("with", slog.Group("g", "x", 2))
		l.WithGroup("grp").Error("group", "k", "v")
		l.Debug("debug")
		l.LogAttrs(ctx, slog.LevelInfo, "request", slog.String("path", "/x"))
	}
	for name, opts := range map[string]*slog.HandlerOptions{
		"nil":   nil,
		"Debug": {Level: slog.LevelDebug},
		"Error": {Level: slog.LevelError},
	} {
		var fast, slow bytes.Buffer
		use(NewJSONLogger(&fast, opts).Handler())
		use(slog.NewJSONHandler(&slow, opts))
		if fast.Len() == 0 {
			t.Fatalf("%s: nothing logged", name)
		}
		if diff := cmp.Diff(mask(slow.String()), mask(fast.String())); diff != "" {
			t.Errorf("%s: output differs from slog's (-slog +fast):\n%s", name, diff)
		}
	}
}

// unsafeWriter fails the test if two Writes overlap.
type unsafeWriter struct {
	t       *testing.T
	writing sync.Mutex
	buf     bytes.Buffer
}

func (w *unsafeWriter) Write(p []byte) (int, error) {
	if !w.writing.TryLock() {
		w.t.Error("concurrent Write")
		return 0, nil
	}
	defer w.writing.Unlock()
	return w.buf.Write(p)
}

// Request lines (written by the fast path) and other lines (written by slog)
// never overlap, even on a writer that is not safe for concurrent use.
func TestNewJSONLoggerSerialisesWrites(t *testing.T) {
	w := &unsafeWriter{t: t}
	logger := NewJSONLogger(w, nil)
	mw := Middleware(logger, func(q string) string { return q },
		func(*http.Request) netip.Addr { return netip.MustParseAddr("192.0.2.1") }, nil)
	h := mw(http.HandlerFunc(func(http.ResponseWriter, *http.Request) {}))
	var wg sync.WaitGroup
	const n = 200
	for range 4 {
		wg.Go(func() {
			for range n {
				h.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest("GET", "/x", nil))
			}
		})
		wg.Go(func() {
			for range n {
				logger.With("a", 1).Info("other", "k", strings.Repeat("v", 100))
			}
		})
	}
	wg.Wait()
	lines := strings.Split(strings.TrimSuffix(w.buf.String(), "\n"), "\n")
	if len(lines) != 8*n {
		t.Errorf("%d lines; want %d", len(lines), 8*n)
	}
	for _, l := range lines {
		if !json.Valid([]byte(l)) {
			t.Fatalf("invalid line %q", l)
		}
	}
}

func FuzzRequestLine(f *testing.F) {
	f.Add("GET", "/api/view", "filename=a.png", true, "ci", "", 200, 1.5, "")
	f.Add("POST", "/a\"b\\c\u2028\xff<>&\x00", "\x80?x", true, "k\xe2\x80", "invalid", 101, 0.001, "eth\"0")
	f.Add("", "", "", false, "", "", 0, 0.0, "")
	f.Fuzz(func(t *testing.T, method, path, query string, hasQuery bool, key, authFailure string, status int, dur float64, zone string) {
		client := netip.MustParseAddr("fe80::1").WithZone(zone)
		l := line{method: method, path: path, query: query, hasQuery: hasQuery, status: status, bytes: int64(status) * 7,
			durationMS: dur, client: client, key: key, authFailure: authFailure, bytesIn: int64(len(path)), aborted: status%2 == 1}
		tm := time.Unix(int64(len(path))*1e6, int64(status)).In(time.FixedZone("", (status%48)*1800))
		got, ok := fastLine(tm, slog.LevelInfo, &l)
		if !ok {
			if !math.IsNaN(dur) && !math.IsInf(dur, 0) {
				t.Fatalf("fast path declined a finite duration %v", dur)
			}
			return
		}
		if want := slogLine(t, tm, slog.LevelInfo, &l); got != want {
			t.Fatalf("fast line\n%q\nslog line\n%q", got, want)
		}
	})
}

// BenchmarkRequestLine measures entry.finish, which builds and writes a
// request's line, on the fast path and through slog.
func BenchmarkRequestLine(b *testing.B) {
	for _, bc := range []struct {
		name   string
		logger *slog.Logger
	}{
		{"fast", NewJSONLogger(io.Discard, nil)},
		{"slog", slog.New(slog.NewJSONHandler(io.Discard, nil))},
	} {
		b.Run(bc.name, func(b *testing.B) {
			e := &entry{logger: bc.logger, redact: func(q string) string { return q }, start: time.Now(),
				method: "GET", path: "/api/view", rawPath: "/api/view", query: "filename=ComfyUI_00001_.png&type=output"}
			e.scope.Client = netip.MustParseAddr("192.0.2.10")
			e.scope.KeyName = "ci"
			e.rec.status, e.rec.bytes = 200, 123456
			ctx := context.Background()
			b.ReportAllocs()
			for b.Loop() {
				e.finish(ctx, false)
			}
		})
	}
}
