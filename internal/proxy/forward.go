package proxy

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"strconv"
	"strings"
	"time"

	"github.com/comfygate/comfygate/internal/auth"
	"github.com/comfygate/comfygate/internal/httpsyntax"
)

// Plain requests to an http:// ComfyUI take this path rather than
// httputil.ReverseProxy and http.Transport. The handler goroutine writes the
// request on a pooled connection and reads the answer from it itself: no
// hand-offs to the Transport's reader and writer goroutines, no clone of the
// request and its header map, no second parse of headers into a map that is
// then copied. Large response bodies go from socket to socket with splice(2)
// (through net/http's ReadFrom). The outbound request is what ReverseProxy
// with the rewrite in proxy.go would send: inbound Host kept, hop-by-hop and
// inbound forwarding headers dropped, fresh X-Forwarded-* (or the trusted
// proxy's chain extended), credentials stripped, the query passed as sent.

// errUpstreamProtocol marks an answer from ComfyUI that is not valid HTTP/1.1.
var errUpstreamProtocol = errors.New("malformed HTTP response from ComfyUI")

// spliceMin is the body size above which a response body is handed to the
// client connection's ReadFrom (splice on Linux) rather than copied through
// a buffer; below it the extra system calls cost more than the copy.
const spliceMin = 64 << 10

// maxResponseHead bounds ComfyUI's status line and headers.
const maxResponseHead = 1 << 20

// forwardable reports whether r can take the direct path.
func (p *Proxy) forwardable(r *http.Request) bool {
	return p.pool != nil && len(r.URL.Path) > 0 && r.URL.Path[0] == '/'
}

// forward sends r to ComfyUI and copies the answer to w.
func (p *Proxy) forward(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	hasBody := r.Body != nil && r.Body != http.NoBody
	for attempt := 0; ; attempt++ {
		uc, reused, err := p.pool.get(r.Context())
		if err != nil {
			p.observe(r, 0, err)
			p.errorHandler(w, r, err)
			return
		}
		retry, err := p.exchange(w, r, uc, start)
		if err == nil {
			return
		}
		// A reused connection that ComfyUI closed just before the request
		// fails before any answer. Without a body the request can be sent
		// again on a fresh connection, as http.Transport would.
		if retry && reused && !hasBody && idempotent(r.Method) && !isTimeout(err) &&
			attempt == 0 && r.Context().Err() == nil {
			continue
		}
		if ctxErr := r.Context().Err(); ctxErr != nil {
			err = ctxErr // the client went away: 499, not a ComfyUI failure
		}
		p.observe(r, 0, err)
		p.errorHandler(w, r, err)
		return
	}
}

// exchange runs one request/response on uc. It returns an error only when
// nothing has been written to w yet (the caller answers 502/504); retry
// says the error came before ComfyUI sent a byte. Failures after the
// status line abort the client's response (http.ErrAbortHandler), as
// ReverseProxy does. uc goes back to the pool or is closed.
func (p *Proxy) exchange(w http.ResponseWriter, r *http.Request, uc *upstreamConn, start time.Time) (retry bool, err error) {
	reusable := false
	defer func() {
		if reusable {
			p.pool.put(uc)
		} else {
			uc.close()
		}
	}()
	// A client that goes away interrupts the exchange: the connection's
	// deadline moves to the past, and the connection is not reused.
	stop := context.AfterFunc(r.Context(), func() { uc.tcp.SetDeadline(aLongTimeAgo) })
	defer func() {
		if !stop() {
			reusable = false
		}
	}()

	if err := p.writeRequest(uc.bw, r, ""); err != nil {
		return true, err
	}
	if t := p.opts.ResponseHeaderTimeout; t > 0 {
		uc.tcp.SetReadDeadline(time.Now().Add(t))
		if err := r.Context().Err(); err != nil {
			return false, err // gone while the deadline was set: it may have replaced the abort
		}
	}
	h := w.Header()
	var addedBuf [16]added
	res, added, err := readResponseHead(uc.br, h, r.Method, addedBuf[:0], false)
	if err != nil {
		// Take back the headers of the broken answer before the error
		// answer is written.
		for i := len(added) - 1; i >= 0; i-- {
			a := added[i]
			if a.prev == 0 {
				delete(h, a.name)
			} else {
				h[a.name] = h[a.name][:a.prev]
			}
		}
		return res.none, err
	}
	if p.opts.ResponseHeaderTimeout > 0 {
		uc.tcp.SetReadDeadline(time.Time{})
	}
	if r.Context().Err() != nil {
		return false, r.Context().Err()
	}
	p.observe(r, time.Since(start), nil)

	w.WriteHeader(res.status)
	switch {
	case res.length == 0:
		reusable = res.keepAlive
	case res.chunked:
		err = copyChunked(w, uc.br)
		reusable = err == nil && res.keepAlive
	case res.length > 0:
		err = copyLength(w, uc, res.length)
		reusable = err == nil && res.keepAlive
	default: // until ComfyUI closes the connection
		err = copyFlushing(w, uc.br)
		if errors.Is(err, io.EOF) {
			err = nil
		}
	}
	if reusable && uc.br.Buffered() > 0 {
		reusable = false // more than the response: out of step
	}
	if err != nil {
		p.log.Warn("upstream body copy failed", "method", r.Method, "path", r.URL.Path, "err", err)
		panic(http.ErrAbortHandler)
	}
	return false, nil
}

// idempotent reports the methods a retry cannot repeat the effect of.
func idempotent(method string) bool {
	switch method {
	case http.MethodGet, http.MethodHead, http.MethodOptions, http.MethodTrace:
		return true
	}
	return false
}

func (p *Proxy) observe(r *http.Request, d time.Duration, err error) {
	if p.opts.Observe != nil {
		p.opts.Observe(r, d, err)
	}
}

// aLongTimeAgo is a deadline in the past: it makes blocked I/O return at once.
var aLongTimeAgo = time.Unix(1, 0)

// writeRequest writes r's head and body to bw and flushes it.
func (p *Proxy) writeRequest(bw *bufio.Writer, r *http.Request, upgrade string) error {
	bw.WriteString(r.Method)
	bw.WriteByte(' ')
	bw.WriteString(p.basePath)
	bw.WriteString(r.URL.EscapedPath())
	query := r.URL.RawQuery
	if p.opts.StripCredentials {
		query = auth.StripQuery(query)
	}
	if query != "" {
		bw.WriteByte('?')
		bw.WriteString(query)
	} else if r.URL.ForceQuery && !p.opts.StripCredentials {
		bw.WriteByte('?')
	}
	bw.WriteString(" HTTP/1.1\r\nHost: ")
	bw.WriteString(r.Host)
	bw.WriteString("\r\n")

	trusted := p.opts.TrustForwarded != nil && p.opts.TrustForwarded(r)
	connTokens := r.Header["Connection"]
	for name, values := range r.Header {
		if skipRequestHeader(name) || (len(connTokens) > 0 && listedIn(connTokens, name)) {
			continue
		}
		if p.opts.StripCredentials {
			if auth.IsCredentialHeader(name) {
				continue
			}
			if name == "Cookie" {
				values = auth.StripCookies(values)
			}
		}
		for _, v := range values {
			writeHeader(bw, name, v)
		}
	}
	if te, ok := r.Header["Te"]; ok && listedIn(te, "trailers") {
		bw.WriteString("Te: trailers\r\n") // as ReverseProxy keeps it
	}

	// X-Forwarded-*: the client's address added to a trusted proxy's chain,
	// or a fresh chain; Host and Proto from a trusted proxy, else our own.
	if client, _, err := net.SplitHostPort(r.RemoteAddr); err == nil {
		bw.WriteString("X-Forwarded-For: ")
		if prior := r.Header["X-Forwarded-For"]; trusted && len(prior) > 0 {
			for _, v := range prior {
				bw.WriteString(v)
				bw.WriteString(", ")
			}
		}
		bw.WriteString(client)
		bw.WriteString("\r\n")
	}
	fwdHost, fwdProto := r.Host, "http"
	if r.TLS != nil {
		fwdProto = "https"
	}
	if trusted {
		if v := r.Header.Get("X-Forwarded-Host"); v != "" {
			fwdHost = v
		}
		if v := r.Header.Get("X-Forwarded-Proto"); v != "" {
			fwdProto = v
		}
	}
	writeHeader(bw, "X-Forwarded-Host", fwdHost)
	writeHeader(bw, "X-Forwarded-Proto", fwdProto)
	if upgrade != "" {
		bw.WriteString("Connection: Upgrade\r\n")
		writeHeader(bw, "Upgrade", upgrade)
	}

	hasBody := r.Body != nil && r.Body != http.NoBody
	switch {
	case hasBody && r.ContentLength > 0:
		bw.WriteString("Content-Length: ")
		bw.Write(strconv.AppendInt(bw.AvailableBuffer(), r.ContentLength, 10))
		bw.WriteString("\r\n\r\n")
		n, err := copyBody(bw, bw, r.Body)
		if err != nil {
			return err
		}
		if n != r.ContentLength {
			return fmt.Errorf("request body: read %d of %d bytes: %w", n, r.ContentLength, io.ErrUnexpectedEOF)
		}
	case hasBody && r.ContentLength < 0:
		bw.WriteString("Transfer-Encoding: chunked\r\n\r\n")
		cw := httputil.NewChunkedWriter(bw)
		if _, err := copyBody(cw, bw, r.Body); err != nil {
			return err
		}
		cw.Close()
		bw.WriteString("\r\n")
	default:
		if r.Method == http.MethodPost || r.Method == http.MethodPut || r.Method == http.MethodPatch {
			bw.WriteString("Content-Length: 0\r\n")
		}
		bw.WriteString("\r\n")
	}
	return bw.Flush()
}

// copyBody copies a request body into w, flushing bw after each piece: a
// client that sends its body slowly must not have a piece held back in the
// buffer while the next read waits.
func copyBody(w io.Writer, bw *bufio.Writer, body io.Reader) (int64, error) {
	buf := getBuffer()
	defer putBuffer(buf)
	var total int64
	for {
		n, err := body.Read(buf[:])
		if n > 0 {
			if _, werr := w.Write(buf[:n]); werr != nil {
				return total, werr
			}
			if werr := bw.Flush(); werr != nil {
				return total, werr
			}
			total += int64(n)
		}
		if err == io.EOF {
			return total, nil
		}
		if err != nil {
			return total, err
		}
	}
}

func writeHeader(bw *bufio.Writer, name, value string) {
	bw.WriteString(name)
	bw.WriteString(": ")
	bw.WriteString(value)
	bw.WriteString("\r\n")
}

// skipRequestHeader reports the inbound headers never sent upstream as they
// are: hop-by-hop headers, the framing headers (rewritten), Expect (the
// body follows at once), and the forwarding headers (set afresh).
func skipRequestHeader(name string) bool {
	switch name {
	case "Connection", "Proxy-Connection", "Keep-Alive", "Proxy-Authenticate",
		"Proxy-Authorization", "Te", "Trailer", "Transfer-Encoding", "Upgrade",
		"Content-Length", "Host", "Expect",
		"Forwarded", "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto", "X-Real-Ip":
		return true
	}
	return false
}

// listedIn reports whether header values (Connection, TE) name token.
func listedIn(values []string, token string) bool {
	for _, v := range values {
		if httpsyntax.ListHas(v, token) {
			return true
		}
	}
	return false
}

// equalFoldTrim compares tok, without surrounding spaces and tabs, to name
// ASCII-case-insensitively.
func equalFoldTrim(tok, name string) bool {
	return httpsyntax.EqualFold(httpsyntax.TrimOWS(tok), name)
}

// responseHead is what the body copy needs to know of ComfyUI's answer.
type responseHead struct {
	status    int
	length    int64 // -1: unknown (chunked or until close)
	chunked   bool
	keepAlive bool
	// none is set when the error came before any byte of the answer.
	none bool
}

// readResponseHead reads the status line and headers of ComfyUI's answer
// to a request with the given method, skipping 1xx interim answers. The
// end-to-end headers go into h (added to what is there, as ReverseProxy
// does); hop-by-hop headers are dropped. Anything ambiguous about the
// framing (two lengths, an encoding other than chunked, folded lines) is an
// error: a proxy that guesses is a proxy that can be smuggled through.
// added notes a header name readResponseHead appended to, and how many
// values it had before.
type added struct {
	name string
	prev int
}

func readResponseHead(br *bufio.Reader, h http.Header, method string, log []added, upgrade bool) (res responseHead, _ []added, err error) {
	res.none = true
	var scratch []byte
	for {
		line, err := readLine(br, &scratch, 0)
		if err != nil {
			return res, log, err
		}
		res.none = false
		proto, status, ok := parseStatusLine(line)
		if !ok {
			return res, log, fmt.Errorf("%w: status line %q", errUpstreamProtocol, truncate(line))
		}
		res.status = status
		res.keepAlive = proto == 1
		if status >= 100 && status < 200 {
			if status == http.StatusSwitchingProtocols {
				if upgrade {
					break
				}
				return res, log, fmt.Errorf("%w: 101 to a request that asked for no upgrade", errUpstreamProtocol)
			}
			// An interim answer (100 Continue, 103 Early Hints): skip it.
			if err := skipHeaders(br, &scratch); err != nil {
				return res, log, err
			}
			continue
		}
		break
	}

	res.length = -1
	var connection []string
	seenLength := false
	size := 0
	for {
		line, err := readLine(br, &scratch, size)
		if err != nil {
			return res, log, err
		}
		size += len(line)
		if len(line) == 0 {
			break
		}
		if line[0] == ' ' || line[0] == '\t' {
			return res, log, fmt.Errorf("%w: folded header line", errUpstreamProtocol)
		}
		colon := bytes.IndexByte(line, ':')
		if colon <= 0 || !httpsyntax.IsToken(line[:colon]) {
			return res, log, fmt.Errorf("%w: header line %q", errUpstreamProtocol, truncate(line))
		}
		value := httpsyntax.TrimOWS(line[colon+1:])
		if !validValue(value) {
			return res, log, fmt.Errorf("%w: invalid value for header %q", errUpstreamProtocol, line[:colon])
		}
		name := canonicalName(line[:colon])
		switch name {
		case "Content-Length":
			n, err := strconv.ParseInt(string(value), 10, 64)
			if err != nil || n < 0 || (seenLength && n != res.length) || !digitsOnly(value) {
				return res, log, fmt.Errorf("%w: Content-Length %q", errUpstreamProtocol, value)
			}
			if seenLength {
				continue // the same length twice: pass it on once
			}
			seenLength = true
			res.length = n
		case "Transfer-Encoding":
			if res.chunked || !equalFoldTrim(string(value), "chunked") {
				return res, log, fmt.Errorf("%w: Transfer-Encoding %q", errUpstreamProtocol, value)
			}
			res.chunked = true
			continue
		case "Connection":
			connection = append(connection, string(value))
			continue
		case "Upgrade":
			if !upgrade || res.status != http.StatusSwitchingProtocols {
				continue
			}
		case "Keep-Alive", "Proxy-Connection", "Proxy-Authenticate", "Proxy-Authorization",
			"Te", "Trailer":
			continue
		}
		log = append(log, added{name, len(h[name])})
		h[name] = append(h[name], string(value))
	}
	if res.chunked {
		// Chunked wins over a length (RFC 9112 section 6.3); the length is
		// not passed on.
		res.length = -1
		delete(h, "Content-Length")
	}
	for _, v := range connection {
		for len(v) > 0 {
			var tok string
			tok, v, _ = strings.Cut(v, ",")
			switch {
			case equalFoldTrim(tok, "close"):
				res.keepAlive = false
			case equalFoldTrim(tok, "keep-alive"):
				// HTTP/1.0 keep-alive is not used: only 1.1 connections are reused.
			case upgrade && res.status == http.StatusSwitchingProtocols && equalFoldTrim(tok, "upgrade"):
				// The switch itself: Upgrade is kept for the handshake.
			default:
				for name := range h {
					if equalFoldTrim(tok, name) {
						log = append(log, added{name, 0})
						delete(h, name)
					}
				}
			}
		}
	}
	if method == http.MethodHead || res.status == http.StatusNoContent || res.status == http.StatusNotModified {
		res.length, res.chunked = 0, false
	}
	if res.length < 0 && !res.chunked {
		res.keepAlive = false // the body ends when ComfyUI closes
	}
	return res, log, nil
}

// readLine reads one CRLF- or LF-terminated line without its ending. The
// line may be in br's buffer or, when longer than it, in *scratch; it is
// valid until the next read. size is what the head held before this line.
func readLine(br *bufio.Reader, scratch *[]byte, size int) ([]byte, error) {
	line, err := br.ReadSlice('\n')
	if err == bufio.ErrBufferFull {
		*scratch = append((*scratch)[:0], line...)
		for err == bufio.ErrBufferFull {
			if size+len(*scratch) > maxResponseHead {
				return nil, fmt.Errorf("%w: response head larger than %d bytes", errUpstreamProtocol, maxResponseHead)
			}
			line, err = br.ReadSlice('\n')
			*scratch = append(*scratch, line...)
		}
		line = *scratch
	}
	if err != nil {
		return nil, err
	}
	if size+len(line) > maxResponseHead {
		return nil, fmt.Errorf("%w: response head larger than %d bytes", errUpstreamProtocol, maxResponseHead)
	}
	line = line[:len(line)-1]
	if n := len(line); n > 0 && line[n-1] == '\r' {
		line = line[:n-1]
	}
	return line, nil
}

func skipHeaders(br *bufio.Reader, scratch *[]byte) error {
	size := 0
	for {
		line, err := readLine(br, scratch, size)
		if err != nil {
			return err
		}
		if len(line) == 0 {
			return nil
		}
		size += len(line)
	}
}

// parseStatusLine parses "HTTP/1.x NNN reason"; minor is the x.
func parseStatusLine(line []byte) (minor, status int, ok bool) {
	if len(line) < 12 || string(line[:7]) != "HTTP/1." || line[8] != ' ' ||
		(len(line) > 12 && line[12] != ' ') {
		return 0, 0, false
	}
	switch line[7] {
	case '0':
		minor = 0
	case '1':
		minor = 1
	default:
		return 0, 0, false
	}
	for _, c := range line[9:12] {
		if c < '0' || c > '9' {
			return 0, 0, false
		}
		status = status*10 + int(c-'0')
	}
	return minor, status, status >= 100
}

func digitsOnly(b []byte) bool {
	for _, c := range b {
		if c < '0' || c > '9' {
			return false
		}
	}
	return len(b) > 0
}

// validValue reports whether b holds only visible characters, spaces, tabs
// and obs-text: no CR, LF, NUL or other controls.
func validValue(b []byte) bool {
	for _, c := range b {
		if (c < ' ' && c != '\t') || c == 0x7f {
			return false
		}
	}
	return true
}

// commonNames interns the canonical names ComfyUI's answers carry, so that
// the usual headers cost no allocation for their names.
var commonNames = func() map[string]string {
	m := make(map[string]string)
	for _, n := range []string{
		"Content-Type", "Content-Length", "Date", "Server", "Cache-Control",
		"Content-Disposition", "Last-Modified", "Etag", "Accept-Ranges",
		"Content-Range", "Content-Encoding", "Vary", "Expires", "Location",
		"Set-Cookie", "Access-Control-Allow-Origin", "Transfer-Encoding",
		"Connection", "Keep-Alive", "Pragma", "X-Content-Type-Options",
		"Content-Security-Policy", "Allow", "Www-Authenticate", "Upgrade",
		"Trailer", "Te", "Proxy-Connection", "Proxy-Authenticate", "Proxy-Authorization",
	} {
		m[n] = n
	}
	return m
}()

// canonicalName returns the canonical form of a valid header name
// (Content-Type for content-type), as http.CanonicalHeaderKey does.
func canonicalName(b []byte) string {
	var buf [64]byte
	if len(b) > len(buf) {
		return http.CanonicalHeaderKey(string(b))
	}
	c := buf[:len(b)]
	upper := true
	for i, ch := range b {
		if upper && 'a' <= ch && ch <= 'z' {
			ch -= 'a' - 'A'
		} else if !upper && 'A' <= ch && ch <= 'Z' {
			ch += 'a' - 'A'
		}
		c[i] = ch
		upper = ch == '-'
	}
	if s, ok := commonNames[string(c)]; ok {
		return s
	}
	return string(c)
}

func truncate(b []byte) []byte {
	if len(b) > 64 {
		return b[:64]
	}
	return b
}

// copyLength copies a body of n bytes from uc to w: what is already
// buffered first, then, for large bodies, straight from the socket so the
// client connection's ReadFrom can splice it.
func copyLength(w http.ResponseWriter, uc *upstreamConn, n int64) error {
	if b := uc.br.Buffered(); b > 0 {
		chunk, _ := uc.br.Peek(int(min(int64(b), n)))
		written, err := w.Write(chunk)
		uc.br.Discard(written)
		n -= int64(written)
		if err != nil {
			return err
		}
	}
	if n == 0 {
		return nil
	}
	buf := getBuffer()
	defer putBuffer(buf)
	if n >= spliceMin && uc.br.Buffered() == 0 {
		written, err := io.CopyBuffer(w, &io.LimitedReader{R: uc.tcp, N: n}, buf[:])
		if err == nil && written < n {
			err = io.ErrUnexpectedEOF
		}
		return err
	}
	written, err := io.CopyBuffer(writerOnly{w}, io.LimitReader(uc.br, n), buf[:])
	if err == nil && written < n {
		err = io.ErrUnexpectedEOF
	}
	return err
}

// copyChunked copies a chunked body, flushing each chunk to the client as
// it comes (its length is unknown, so it may be a stream), then reads the
// trailer section, which is not passed on.
func copyChunked(w http.ResponseWriter, br *bufio.Reader) error {
	if err := copyFlushing(w, httputil.NewChunkedReader(br)); err != nil {
		return err
	}
	var scratch []byte
	return skipHeaders(br, &scratch)
}

// copyFlushing copies src to w, flushing after every read.
func copyFlushing(w http.ResponseWriter, src io.Reader) error {
	rc := http.NewResponseController(w)
	buf := getBuffer()
	defer putBuffer(buf)
	for {
		n, err := src.Read(buf[:])
		if n > 0 {
			if _, werr := w.Write(buf[:n]); werr != nil {
				return werr
			}
			rc.Flush()
		}
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
	}
}
