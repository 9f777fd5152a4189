package proxy

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"

	"github.com/comfygate/comfygate/internal/jsonerr"
	"github.com/comfygate/comfygate/internal/upstream"
)

// WebSockets (and any other HTTP/1.1 upgrade) take this path rather than
// httputil.ReverseProxy's. ReverseProxy keeps four goroutines per upgraded
// connection (the handler, a context watcher and two io.Copy loops with a
// 32 KiB buffer each) and the server connection's bufio reader and writer,
// about 40 KiB for an idle socket. Here the handshake goes through the same
// Transport, but once the 101 is passed on the handler returns, and two
// goroutines copy the bytes with a small buffer that is only swapped for a
// pooled 32 KiB one while a burst is flowing. An idle WebSocket then holds
// little more than two small goroutine stacks. The request log line is still
// written when the socket closes (requestlog's recorder waits for the
// hijacked connection's Close).

// upgradeType returns the protocol a request or response asks to switch to:
// the Upgrade header, if Connection lists the "upgrade" token.
func upgradeType(h http.Header) string {
	for _, v := range h["Connection"] {
		for tok := range strings.SplitSeq(v, ",") {
			if strings.EqualFold(strings.TrimSpace(tok), "upgrade") {
				return h.Get("Upgrade")
			}
		}
	}
	return ""
}

// hopHeaders are removed from every forwarded message (RFC 9110 section 7.6.1).
var hopHeaders = []string{
	"Connection", "Proxy-Connection", "Keep-Alive", "Proxy-Authenticate",
	"Proxy-Authorization", "Te", "Trailer", "Transfer-Encoding", "Upgrade",
}

func removeHopByHop(h http.Header) {
	for _, f := range h["Connection"] {
		for tok := range strings.SplitSeq(f, ",") {
			if tok = strings.TrimSpace(tok); tok != "" {
				h.Del(tok)
			}
		}
	}
	for _, f := range hopHeaders {
		delete(h, f)
	}
}

func isPrint(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < ' ' || s[i] > '~' {
			return false
		}
	}
	return true
}

// serveUpgrade proxies a request that asks to switch protocols (upType) to
// server u. The handshake goes through u's Transport like any request; once
// the 101 is passed on, two goroutines copy the bytes (pump) and the
// handler returns.
func (p *Proxy) serveUpgrade(w http.ResponseWriter, r *http.Request, u *upstream.Upstream, upType string) {
	if !isPrint(upType) {
		jsonerr.Write(w, http.StatusBadRequest, "bad_request", "the Upgrade header is not valid")
		return
	}
	// A handshake has no body. One that claims a body would leave the
	// Transport reading it from the client connection while the upgraded
	// stream reads the same connection.
	if r.ContentLength != 0 || len(r.TransferEncoding) > 0 {
		jsonerr.Write(w, http.StatusBadRequest, "bad_request", "a protocol upgrade request must not have a body")
		return
	}
	backConn, resHeader := p.handshake(w, r, u, upType)
	if backConn == nil {
		return // answered already
	}

	conn, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		backConn.Close()
		p.log.Warn("cannot take over the connection for a protocol switch", "err", err)
		jsonerr.Write(w, http.StatusInternalServerError, "internal_error", "the gateway could not switch protocols")
		return
	}
	res := &http.Response{StatusCode: http.StatusSwitchingProtocols, ProtoMajor: 1, ProtoMinor: 1, Header: w.Header()}
	copyHeader(res.Header, resHeader)
	err = res.Write(brw)
	if err == nil {
		err = brw.Flush()
	}
	if err != nil { // the client is gone
		conn.Close()
		backConn.Close()
		return
	}
	// Bytes the client sent right behind its request are in the server's
	// reader; pass them on, then let the reader and writer go.
	var early []byte
	if n := brw.Reader.Buffered(); n > 0 {
		early, _ = brw.Reader.Peek(n)
		early = append([]byte(nil), early...)
	}

	c := &streamConn{Conn: conn, s: &p.streams, keyID: keyID(r), done: make(chan struct{})}
	c.started.Store(true) // the 101 is out: a close frame may follow it
	p.streams.add(c)
	var once sync.Once
	closeBoth := func() {
		once.Do(func() {
			c.Close()
			backConn.Close()
		})
	}
	go func() {
		defer closeBoth()
		if len(early) > 0 {
			c.s.in.Add(int64(len(early)))
			if _, err := backConn.Write(early); err != nil {
				return
			}
		}
		pump(backConn, c)
	}()
	go func() {
		defer closeBoth()
		pump(c, backConn)
	}()
}

// handshake sends the upgrade request to u (on a connection of its own:
// the Transport never pools a connection that switched protocols). It
// returns that connection and the 101's headers, or nil after answering w
// itself: with ComfyUI's refusal (a bad origin, an unknown path) or with
// the gateway's error.
func (p *Proxy) handshake(w http.ResponseWriter, r *http.Request, u *upstream.Upstream, upType string) (io.ReadWriteCloser, http.Header) {
	out := r.Clone(r.Context())
	out.Body = nil
	out.Close = false
	removeHopByHop(out.Header)
	out.Header.Set("Connection", "Upgrade")
	out.Header.Set("Upgrade", upType)
	for _, h := range []string{"Forwarded", "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto"} {
		delete(out.Header, h)
	}
	p.outbound(out, r, u)
	if _, ok := out.Header["User-Agent"]; !ok {
		out.Header.Set("User-Agent", "") // not Go's default
	}

	x := &exchange{p: p, u: u}
	res, err := x.RoundTrip(out)
	if err != nil {
		x.errorHandler(w, r, err)
		return nil, nil
	}
	if res.StatusCode != http.StatusSwitchingProtocols {
		// Refused: pass the answer on.
		defer res.Body.Close()
		removeHopByHop(res.Header)
		copyHeader(w.Header(), res.Header)
		w.WriteHeader(res.StatusCode)
		buf := getBuffer()
		defer putBuffer(buf)
		io.CopyBuffer(writerOnly{w}, res.Body, buf[:])
		return nil, nil
	}
	backConn, ok := res.Body.(io.ReadWriteCloser)
	resType := upgradeType(res.Header)
	switch {
	case !ok:
		err = errors.New("internal error: 101 switching protocols response with non-writable body")
	case !isPrint(resType):
		err = fmt.Errorf("ComfyUI tried to switch to invalid protocol %q", resType)
	case !strings.EqualFold(resType, upType):
		err = fmt.Errorf("ComfyUI tried to switch protocol %q when %q was requested", resType, upType)
	}
	if err != nil {
		res.Body.Close()
		x.errorHandler(w, r, err)
		return nil, nil
	}
	removeHopByHop(res.Header)
	res.Header.Set("Connection", "Upgrade")
	res.Header.Set("Upgrade", resType)
	return backConn, res.Header
}

// smallRead is the buffer an idle direction of a WebSocket waits with.
const smallRead = 512

// pump copies src to dst until either fails. It waits for data with a small
// buffer; when a read fills it, more is probably coming (a 64 KiB preview
// image, say), so it borrows a pooled 32 KiB buffer until a read does not
// fill it, and gives it back before it waits again.
func pump(dst io.Writer, src io.Reader) error {
	small := make([]byte, smallRead)
	for {
		n, err := src.Read(small)
		if n > 0 {
			if _, werr := dst.Write(small[:n]); werr != nil {
				return werr
			}
		}
		if err != nil {
			return err
		}
		if n < len(small) {
			continue
		}
		buf := getBuffer()
		for {
			n, err = src.Read(buf[:])
			if n > 0 {
				if _, werr := dst.Write(buf[:n]); werr != nil {
					putBuffer(buf)
					return werr
				}
			}
			if err != nil {
				putBuffer(buf)
				return err
			}
			if n < len(buf) {
				break
			}
		}
		putBuffer(buf)
	}
}

// writerOnly hides a ResponseWriter's other methods (ReadFrom) from io.Copy.
type writerOnly struct{ io.Writer }

func copyHeader(dst, src http.Header) {
	for k, vv := range src {
		for _, v := range vv {
			dst.Add(k, v)
		}
	}
}
