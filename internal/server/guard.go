package server

import (
	"io"
	"log/slog"
	"net/http"
	"strings"
	"time"

	"github.com/comfygate/comfygate/internal/jsonerr"
	"github.com/comfygate/comfygate/internal/proxy"
	"github.com/comfygate/comfygate/internal/reqscope"
	"github.com/comfygate/comfygate/internal/route"
)

// allowedMethods are the methods ComfyUI and its custom nodes use. Anything
// else (CONNECT, TRACE, made-up methods) is refused before any other layer
// sees it, and never reaches ComfyUI.
var allowedMethods = map[string]bool{
	http.MethodGet: true, http.MethodHead: true, http.MethodPost: true, http.MethodPut: true,
	http.MethodPatch: true, http.MethodDelete: true, http.MethodOptions: true,
}

const allowHeader = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"

// guardOptions configure guard.
type guardOptions struct {
	// BodyTimeout is how long a request body may go without a byte.
	BodyTimeout time.Duration
	// CORSOrigin is --enable-cors-header ("" when off).
	CORSOrigin string
	// Via is the gateway's name in the Via header it adds upstream.
	Via string
	// Logger is told of request loops.
	Logger *slog.Logger
}

// guard refuses what ComfyUI never needs before it reaches any other layer,
// and bounds request bodies:
//   - methods other than those in allowedMethods get 405, and a request
//     target that is not a path (OPTIONS *, a:b) gets 400;
//   - a body on a public GET or HEAD (the UI page, static files, /ws) gets
//     400, rather than being streamed to ComfyUI without a key;
//   - a CORS preflight for a protected route is answered here (ComfyUI
//     answers every OPTIONS with an empty 200 anyway); one for a public
//     route goes on to ComfyUI;
//   - a request body that goes BodyTimeout without a byte ends the request
//     (the client that sends headers and then nothing);
//   - a request that this gateway already forwarded (its own Via name is
//     in the Via header: an --upstream that leads back to it) gets 508
//     once, instead of going round until file descriptors run out;
//   - a request refused with its body unread (401, 413, ...) is answered
//     and its connection closed with a lingering close (lingerClose),
//     instead of net/http reading up to 256 KiB of it first or resetting
//     the connection under the client's feet.
func guard(opts guardOptions) Middleware {
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if !allowedMethods[r.Method] {
				w.Header().Set("Allow", allowHeader)
				refuse(w, http.StatusMethodNotAllowed, "method_not_allowed", "this method is not allowed; ComfyUI uses "+allowHeader)
				return
			}
			if opts.Via != "" && proxy.LoopDetected(r, opts.Via) {
				opts.Logger.Warn("request loop: this gateway received a request it forwarded itself; --upstream must be ComfyUI, not comfygate",
					"method", r.Method, "path", r.URL.Path)
				refuse(w, http.StatusLoopDetected, "loop_detected",
					"the request came back to the gateway that forwarded it: its --upstream points at itself")
				return
			}
			if r.URL.Opaque != "" || !strings.HasPrefix(r.URL.Path, "/") {
				// "OPTIONS *", "GET a:b": forms ComfyUI has no route for,
				// and whose path the gateway would have to guess.
				refuse(w, http.StatusBadRequest, "bad_request", "the request target must be a path such as /prompt")
				return
			}
			hasBody := r.ContentLength != 0 || len(r.TransferEncoding) > 0
			// The route entry requestlog classified: a public request is a
			// GET or HEAD, a preflight may go on only for a public path.
			entry := reqscope.From(r.Context()).Route
			if hasBody && entry.Access == route.Public {
				refuse(w, http.StatusBadRequest, "bad_request", "a GET or HEAD request must not have a body")
				return
			}
			if entry.Access == route.Preflight && !entry.PublicPath {
				if opts.CORSOrigin != "" {
					proxy.SetCORS(w.Header(), opts.CORSOrigin)
				}
				w.Header().Set("Content-Length", "0")
				w.WriteHeader(http.StatusOK)
				return
			}
			if !hasBody {
				next.ServeHTTP(w, r)
				return
			}
			// Until the request is known to be forwarded (the proxy takes
			// this header away), a refusal closes the connection.
			w.Header().Set("Connection", "close")
			rc := http.NewResponseController(w)
			rc.SetReadDeadline(time.Now().Add(opts.BodyTimeout))
			body := &deadlineBody{ReadCloser: r.Body, rc: rc, timeout: opts.BodyTimeout}
			r.Body = body
			next.ServeHTTP(w, r)
			if !body.done && w.Header().Get("Connection") == "close" {
				lingerClose(w, rc)
			}
		})
	}
}

// How long a lingering close reads what the client still sends: in all,
// and without a byte. nginx's lingering_time and lingering_timeout.
const (
	lingerTime    = 10 * time.Second
	lingerTimeout = 2 * time.Second
)

// lingerClose ends the connection of a request that was answered with its
// body unread, as nginx's lingering close does. Closing a socket with
// unread data in it makes the kernel send a reset, which can destroy the
// answer before the client reads it (a client still sending a 5 MB upload
// sees ECONNRESET instead of the 413). So the answer is flushed, the
// gateway's side is shut for writing, and what the client still sends is
// read and thrown away until it stops, for lingerTime at most.
func lingerClose(w http.ResponseWriter, rc *http.ResponseController) {
	if rc.Flush() != nil {
		rc.SetReadDeadline(time.Now())
		return
	}
	// The connection is taken from net/http's own writer, under the
	// request log's: the request ended with the answer, and the linger
	// that follows is not part of it (it is no WebSocket to count).
	inner := w
	for {
		u, ok := inner.(interface{ Unwrap() http.ResponseWriter })
		if !ok {
			break
		}
		inner = u.Unwrap()
	}
	conn, brw, err := http.NewResponseController(inner).Hijack()
	if err != nil {
		// Not HTTP/1 (a test's recorder): net/http closes it as before.
		rc.SetReadDeadline(time.Now())
		return
	}
	go func() {
		defer conn.Close()
		if cw, ok := conn.(interface{ CloseWrite() error }); ok {
			cw.CloseWrite() // the FIN after the answer; TLS sends close_notify first
		}
		buf := make([]byte, 16<<10)
		end := time.Now().Add(lingerTime)
		for {
			now := time.Now()
			if !now.Before(end) {
				return
			}
			conn.SetReadDeadline(now.Add(min(end.Sub(now), lingerTimeout)))
			if _, err := brw.Read(buf); err != nil {
				return
			}
		}
	}()
}

// refuse answers with the gateway's JSON error and closes the connection
// after it: what the client sent next on it is not to be trusted.
func refuse(w http.ResponseWriter, status int, code, message string) {
	w.Header().Set("Connection", "close")
	jsonerr.Write(w, status, code, message)
}

// deadlineBody moves the connection's read deadline BodyTimeout ahead
// before each read, so a body may take as long as it likes while bytes
// keep coming. At the body's end the deadline is cleared: net/http then
// reads the connection in the background to notice a client that leaves,
// and a deadline left in place would end that request.
type deadlineBody struct {
	io.ReadCloser
	rc      *http.ResponseController
	timeout time.Duration
	done    bool
}

func (b *deadlineBody) Read(p []byte) (int, error) {
	if b.done {
		return b.ReadCloser.Read(p)
	}
	b.rc.SetReadDeadline(time.Now().Add(b.timeout))
	n, err := b.ReadCloser.Read(p)
	if err == io.EOF {
		b.done = true
		b.rc.SetReadDeadline(time.Time{})
	}
	return n, err
}
