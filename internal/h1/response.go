package h1

import (
	"bufio"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/comfygate/comfygate/internal/httpsyntax"
)

// response is the http.ResponseWriter of a request served here. The status
// and headers are fixed at WriteHeader, as with net/http; the head goes out
// with the first body bytes that do not fit the buffer, at Flush, or when
// the handler returns. A body that fits in the buffer gets a
// Content-Length; a longer one without a Content-Length is sent chunked.
type response struct {
	c      *conn
	req    *http.Request
	header http.Header

	wroteHeader bool
	status      int
	// head is the serialised status line and headers, without framing.
	head []byte
	// declared is the handler's Content-Length (-1: none).
	declared int64
	// sniff is set when the handler set no Content-Type: it is detected
	// from the first body bytes (sniffed), as net/http does.
	sniff   bool
	sniffed string
	noBody  bool // HEAD, 1xx, 204, 304

	committed bool
	chunked   bool
	buf       []byte // body held back before the head is written
	written   int64

	closeAfter bool
	aborted    bool
	// unread is what the handler left of the request body, once the
	// handler has returned (before that, the body itself says).
	unread int64
}

func (w *response) reset(r *http.Request) {
	if w.header == nil {
		w.header = make(http.Header)
	} else {
		clear(w.header)
	}
	w.req = r
	w.wroteHeader, w.status, w.head, w.declared = false, 0, w.head[:0], -1
	w.sniff, w.sniffed, w.noBody, w.committed, w.chunked = false, "", false, false, false
	w.buf, w.written = w.buf[:0], 0
	w.closeAfter, w.aborted, w.unread = false, false, 0
}

func (w *response) Header() http.Header { return w.header }

func (w *response) WriteHeader(code int) {
	if w.wroteHeader {
		return
	}
	if code < 100 || code > 999 {
		panic("h1: invalid WriteHeader code " + strconv.Itoa(code))
	}
	if code < 200 && code != http.StatusSwitchingProtocols {
		return // interim answers are not sent (see the package doc)
	}
	w.wroteHeader = true
	w.status = code
	w.noBody = w.req.Method == http.MethodHead || code < 200 || code == http.StatusNoContent || code == http.StatusNotModified

	head := append(w.head[:0], "HTTP/1.1 "...)
	head = strconv.AppendInt(head, int64(code), 10)
	head = append(head, ' ')
	if text := http.StatusText(code); text != "" {
		head = append(head, text...)
	} else {
		head = append(head, "status code "...)
		head = strconv.AppendInt(head, int64(code), 10)
	}
	head = append(head, "\r\n"...)
	_, hasType := w.header["Content-Type"]
	_, hasDate := w.header["Date"]
	for name, values := range w.header {
		switch name {
		case "Content-Type":
			if code == http.StatusNotModified {
				continue // as net/http: a 304 carries no representation metadata
			}
		case "Content-Length":
			if code == http.StatusNotModified {
				continue
			}
			if len(values) > 0 {
				if n, ok := parseLength(values[0]); ok {
					w.declared = n
				}
			}
			continue
		case "Transfer-Encoding", "Trailer":
			continue
		case "Connection":
			for _, v := range values {
				if httpsyntax.ListHas(v, "close") {
					w.closeAfter = true
				}
			}
			continue
		}
		if !isToken(name) {
			continue
		}
		for _, v := range values {
			head = appendHeader(head, name, v)
		}
	}
	if !hasDate {
		head = appendHeader(head, "Date", httpDate())
	}
	w.sniff = !hasType && code >= 200 && code != http.StatusNoContent && code != http.StatusNotModified
	w.head = head
}

func (w *response) Write(p []byte) (int, error) {
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	if w.noBody {
		if w.req.Method == http.MethodHead {
			w.noteSniff(p)
			w.written += int64(len(p)) // discarded, but counted for the length
			return len(p), nil
		}
		return 0, http.ErrBodyNotAllowed
	}
	if w.declared >= 0 && w.written+int64(len(p)) > w.declared {
		return 0, http.ErrContentLength
	}
	if !w.committed {
		if w.declared < 0 && len(w.buf)+len(p) <= writeBufferSize {
			w.buf = append(w.buf, p...)
			w.written += int64(len(p))
			return len(p), nil
		}
		if len(w.buf) == 0 {
			w.noteSniff(p)
		}
		if err := w.commit(false); err != nil {
			return 0, err
		}
	}
	return w.writeBody(p)
}

func (w *response) writeBody(p []byte) (int, error) {
	bw := w.c.bw
	if w.chunked {
		if len(p) == 0 {
			return 0, nil
		}
		bw.Write(strconv.AppendInt(bw.AvailableBuffer(), int64(len(p)), 16))
		bw.WriteString("\r\n")
		n, err := bw.Write(p)
		bw.WriteString("\r\n")
		w.written += int64(n)
		return n, err
	}
	n, err := bw.Write(p)
	w.written += int64(n)
	return n, err
}

// noteSniff detects the Content-Type from the first body bytes, if the
// handler set none.
func (w *response) noteSniff(p []byte) {
	if w.sniff && w.sniffed == "" && len(p) > 0 {
		w.sniffed = http.DetectContentType(p)
	}
}

// commit writes the head. final says the handler has returned, so a body
// held back in buf is all there is and its length is known.
func (w *response) commit(final bool) error {
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	w.committed = true
	bw := w.c.bw
	bw.Write(w.head)
	w.noteSniff(w.buf)
	if w.sniffed != "" {
		writeHeaderLine(bw, "Content-Type", w.sniffed)
	}
	switch {
	case w.status < 200 || w.status == http.StatusNoContent || w.status == http.StatusNotModified:
	case w.noBody: // HEAD: the length the body would have, if known
		if w.declared >= 0 {
			writeHeaderLine(bw, "Content-Length", strconv.FormatInt(w.declared, 10))
		} else if final && w.req.Method == http.MethodHead && w.written > 0 {
			writeHeaderLine(bw, "Content-Length", strconv.FormatInt(w.written, 10))
		}
	case w.declared >= 0:
		writeHeaderLine(bw, "Content-Length", strconv.FormatInt(w.declared, 10))
	case final:
		writeHeaderLine(bw, "Content-Length", strconv.Itoa(len(w.buf)))
	default:
		w.chunked = true
		bw.WriteString("Transfer-Encoding: chunked\r\n")
	}
	unread := w.unread
	if w.c.body != nil {
		unread = w.c.body.unread()
	}
	if unread > maxDrain || w.c.s.closing.Load() {
		w.closeAfter = true // the connection ends after this answer
	}
	if w.closeAfter || w.req.Close {
		bw.WriteString("Connection: close\r\n")
		w.closeAfter = true
	}
	bw.WriteString("\r\n")
	if len(w.buf) > 0 && !w.noBody {
		held := w.buf
		w.written -= int64(len(held))
		w.buf = w.buf[:0]
		if _, err := w.writeBody(held); err != nil {
			return err
		}
	}
	return nil
}

// Flush sends the head and what is buffered.
func (w *response) Flush() {
	if !w.committed {
		w.commit(false)
	}
	w.c.bw.Flush()
}

// FlushError is Flush with its error, for http.ResponseController.
func (w *response) FlushError() error {
	if !w.committed {
		if err := w.commit(false); err != nil {
			return err
		}
	}
	return w.c.bw.Flush()
}

// ReadFrom sends a body from src. With a declared length and a socket as
// the source, the kernel moves it (splice) without copying it through
// user space.
func (w *response) ReadFrom(src io.Reader) (int64, error) {
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	if w.noBody || w.declared < 0 || (w.sniff && w.sniffed == "") {
		return io.Copy(writerOnly{w}, src)
	}
	if !w.committed {
		if err := w.commit(false); err != nil {
			return 0, err
		}
	}
	if err := w.c.bw.Flush(); err != nil {
		return 0, err
	}
	left := w.declared - w.written
	// splice(2) looks through one io.LimitedReader to the socket; keep it
	// to one.
	lr, ok := src.(*io.LimitedReader)
	if !ok || lr.N > left {
		lr = &io.LimitedReader{R: src, N: left}
	}
	n, err := w.c.tcp.ReadFrom(lr)
	w.written += n
	return n, err
}

type writerOnly struct{ io.Writer }

// finish completes the response after the handler returned.
func (w *response) finish() error {
	if !w.committed {
		if err := w.commit(true); err != nil {
			return err
		}
	}
	bw := w.c.bw
	if w.chunked {
		bw.WriteString("0\r\n\r\n")
	}
	if !w.noBody && w.declared >= 0 && w.written < w.declared {
		w.closeAfter = true // a short body: the client must not wait for more
	}
	return bw.Flush()
}

func appendHeader(b []byte, name, value string) []byte {
	b = append(b, name...)
	b = append(b, ": "...)
	b = appendValue(b, value)
	return append(b, "\r\n"...)
}

func writeHeaderLine(bw *bufio.Writer, name, value string) {
	bw.WriteString(name)
	bw.WriteString(": ")
	bw.Write(appendValue(bw.AvailableBuffer(), value))
	bw.WriteString("\r\n")
}

// appendValue appends a header value with CR and LF replaced by spaces, as
// net/http writes them: a value can never start a header of its own.
func appendValue(b []byte, v string) []byte {
	if strings.IndexByte(v, '\r') < 0 && strings.IndexByte(v, '\n') < 0 {
		return append(b, v...)
	}
	for i := 0; i < len(v); i++ {
		c := v[i]
		if c == '\r' || c == '\n' {
			c = ' '
		}
		b = append(b, c)
	}
	return b
}

// httpDate is the Date header value, formatted once a second.
func httpDate() string {
	now := time.Now().Unix()
	if d := date.Load(); d != nil && d.unix == now {
		return d.text
	}
	d := &dateText{unix: now, text: time.Unix(now, 0).UTC().Format(http.TimeFormat)}
	date.Store(d)
	return d.text
}

type dateText struct {
	unix int64
	text string
}

var date atomic.Pointer[dateText]
