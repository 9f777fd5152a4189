package proxy

import (
	"bufio"
	"bytes"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/comfygate/comfygate/internal/session"
)

// fuzzKey is the API key the harness puts in the credential positions that
// the fuzzer picks (see placeKey); the fuzzer's own text never holds it.
const fuzzKey = "k3y-fuzz-0123456789abcdef012345"

// placeKey adds fuzzKey to query and headers in every credential position
// whose bit is set in where.
func placeKey(where uint8, query, headers string) (string, string) {
	addQ := func(pair string) {
		if query != "" {
			query += "&"
		}
		query += pair
	}
	addH := func(line string) {
		if headers != "" {
			headers += "\r\n"
		}
		headers += line
	}
	if where&1 != 0 {
		addH("Authorization: Bearer " + fuzzKey)
	}
	if where&2 != 0 {
		addH("X-API-Key: " + fuzzKey)
	}
	if where&4 != 0 {
		addQ("api_key=" + fuzzKey)
	}
	if where&8 != 0 {
		addQ("token=" + fuzzKey)
	}
	if where&16 != 0 {
		addH("Referer: http://gw/?x=1&token=" + fuzzKey)
	}
	if where&32 != 0 {
		addQ("api%5Fkey=" + url.QueryEscape(fuzzKey))
	}
	if where&64 != 0 {
		addH("Cookie: a=1; " + session.CookieName + "=" + fuzzKey + "; b=2")
	}
	return query, headers
}

// recordingComfy accepts connections, answers every complete request with
// an empty 200, and hands over everything a connection carried once it
// closes.
type recordingComfy struct {
	ln    net.Listener
	conns chan []byte
}

func newRecordingComfy(t testing.TB) *recordingComfy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	rc := &recordingComfy{ln: ln, conns: make(chan []byte, 16)}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go rc.serve(c)
		}
	}()
	t.Cleanup(func() { ln.Close() })
	return rc
}

func (rc *recordingComfy) serve(c net.Conn) {
	defer c.Close()
	var seen bytes.Buffer
	br := bufio.NewReader(io.TeeReader(c, &seen))
	for {
		req, err := http.ReadRequest(br)
		if err != nil {
			break
		}
		_, err = io.Copy(io.Discard, req.Body)
		if err != nil {
			break
		}
		io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
	}
	io.Copy(io.Discard, br) // whatever is left, for the record
	rc.conns <- seen.Bytes()
}

var fuzzMethods = []string{"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}

// FuzzOutbound checks what ComfyUI receives for any request the gateway's
// HTTP server would accept, by sending it through the proxy to a
// recording server over loopback and parsing what arrived:
//   - no credential anywhere in the head: no key value (plain or escaped),
//     no Authorization or X-API-Key header, no api_key or token parameter,
//     no session cookie, no key in the Referer;
//   - framing: at most one Content-Length, never with Transfer-Encoding,
//     and the body exactly the client's;
//   - nothing after the request: the bytes parse as exactly one request;
//   - method and path as the client sent them.
func FuzzOutbound(f *testing.F) {
	f.Add(uint8(2), uint8(1|2|8), "/prompt", "", "", []byte(`{"prompt":{}}`), false)
	f.Add(uint8(0), uint8(4|16|64), "/view", "filename=a.png&preview=webp;90", "Cookie: c=3", []byte{}, false)
	f.Add(uint8(3), uint8(32), "/upload/image", "x", "Content-Type: text/plain\r\nConnection: X-API-Key, Keep-Alive\r\nKeep-Alive: 5", []byte("hello"), true)
	f.Add(uint8(0), uint8(127), "/api/history", "TOKEN=a&Api_Key=b", "Authorization: bearer other\r\nTe: trailers", []byte{}, false)
	f.Add(uint8(2), uint8(0), "/prompt", "", "Transfer-Encoding: chunked\r\nContent-Length: 5", []byte("hello"), true)
	f.Add(uint8(5), uint8(2), "/queue", "a=1&&token", "Proxy-Authorization: Basic abc\r\nForwarded: for=1.2.3.4\r\nX-Forwarded-For: 6.6.6.6", []byte(`{"delete":["x"]}`), false)

	comfy := newRecordingComfy(f)
	// The gateway's side is a real net/http server, so that only requests
	// it accepts reach the proxy; each input gets a proxy of its own (and
	// so a connection to ComfyUI of its own).
	var (
		p       *Proxy
		reached bool
	)
	gw := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		reached = true
		p.ServeHTTP(w, r)
	}))
	f.Cleanup(gw.Close)
	f.Fuzz(func(t *testing.T, m, where uint8, path, query, headers string, body []byte, chunked bool) {
		if strings.Contains(path+query+headers+string(body), fuzzKey) {
			return
		}
		method := fuzzMethods[int(m)%len(fuzzMethods)]
		query, headers = placeKey(where, query, headers)
		raw := buildRequest(method, path, query, headers, body, chunked)
		rawReader := bufio.NewReader(strings.NewReader(raw))
		in, err := http.ReadRequest(rawReader)
		if err != nil || in.Header.Get("Upgrade") != "" || in.URL.Opaque != "" || !strings.HasPrefix(in.URL.Path, "/") {
			return // net/http or the gateway's guard refuses it, or it takes the upgrade path
		}
		wantBody, err := io.ReadAll(in.Body)
		if err != nil || rawReader.Buffered() > 0 {
			// A malformed body (the client gets 400, see
			// TestClientFaultsAreNotComfyUIs), or the fuzzer's own framing
			// headers left a second request behind the first.
			return
		}

		p = New(poolOf(t, "http://"+comfy.ln.Addr().String()), Options{StripCredentials: true, Logger: slog.New(slog.DiscardHandler)})
		reached = false
		c, err := net.Dial("tcp", gw.Listener.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		io.WriteString(c, raw)
		res, err := http.ReadResponse(bufio.NewReader(c), nil)
		p.Close()
		if !reached {
			return // net/http refused it (a bad header name or value, say)
		}
		if err != nil {
			t.Fatalf("no answer: %v for\n%q", err, raw)
		}
		if res.StatusCode != 200 {
			t.Fatalf("status %d for\n%q", res.StatusCode, raw)
		}
		var got []byte
		select {
		case got = <-comfy.conns:
		case <-time.After(10 * time.Second):
			t.Fatal("the connection to ComfyUI was not closed")
		}

		br := bufio.NewReader(bytes.NewReader(got))
		out, err := http.ReadRequest(br)
		if err != nil {
			t.Fatalf("ComfyUI received an unparsable request: %v\n%q", err, got)
		}
		gotBody, err := io.ReadAll(out.Body)
		if err != nil {
			t.Fatalf("ComfyUI's request body: %v\n%q", err, got)
		}
		if rest, _ := io.ReadAll(br); len(rest) > 0 {
			t.Fatalf("bytes after the request: %q\nin %q", rest, got)
		}
		if !bytes.Equal(gotBody, wantBody) {
			t.Fatalf("body %q; want %q", gotBody, wantBody)
		}
		head, _, _ := bytes.Cut(got, []byte("\r\n\r\n"))
		lower := strings.ToLower(string(head))
		for _, k := range []string{fuzzKey, url.QueryEscape(fuzzKey), strings.ToLower(fuzzKey)} {
			if strings.Contains(lower, strings.ToLower(k)) {
				t.Fatalf("the key reached ComfyUI:\n%s", head)
			}
		}
		if out.Header.Get("Authorization") != "" || out.Header.Get("X-Api-Key") != "" {
			t.Fatalf("a credential header reached ComfyUI:\n%s", head)
		}
		for _, c := range out.Cookies() {
			if c.Name == session.CookieName {
				t.Fatalf("the session cookie reached ComfyUI:\n%s", head)
			}
		}
		for pair := range strings.SplitSeq(out.URL.RawQuery, "&") {
			name, _, _ := strings.Cut(pair, "=")
			if n, err := url.QueryUnescape(name); err == nil && (n == "api_key" || n == "token") {
				t.Fatalf("a key parameter reached ComfyUI: %q", out.URL.RawQuery)
			}
		}
		if cl := strings.Count(lower, "\r\ncontent-length:"); cl > 1 || (cl == 1 && strings.Contains(lower, "\r\ntransfer-encoding:")) {
			t.Fatalf("ambiguous framing:\n%s", head)
		}
		if out.Method != in.Method || out.URL.EscapedPath() != in.URL.EscapedPath() {
			t.Fatalf("%s %s reached ComfyUI as %s %s", in.Method, in.URL.EscapedPath(), out.Method, out.URL.EscapedPath())
		}
	})
}

// buildRequest writes an HTTP/1.1 request with the given parts; headers is
// CRLF-separated lines.
func buildRequest(method, path, query, headers string, body []byte, chunked bool) string {
	var b strings.Builder
	b.WriteString(method + " " + path)
	if query != "" {
		b.WriteString("?" + query)
	}
	b.WriteString(" HTTP/1.1\r\nHost: comfy.example\r\n")
	if headers != "" {
		b.WriteString(headers + "\r\n")
	}
	switch {
	case chunked:
		b.WriteString("Transfer-Encoding: chunked\r\n\r\n")
		if len(body) > 0 {
			b.WriteString(strconv.FormatInt(int64(len(body)), 16) + "\r\n" + string(body) + "\r\n")
		}
		b.WriteString("0\r\n\r\n")
	case len(body) > 0:
		b.WriteString("Content-Length: " + strconv.Itoa(len(body)) + "\r\n\r\n" + string(body))
	default:
		b.WriteString("\r\n")
	}
	return b.String()
}
