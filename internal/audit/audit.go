// Package audit writes the audit trail: one JSON line for every request that
// changes state in ComfyUI (a prompt queued, an upload, an interrupt, a queue
// or history deletion, /free, a ComfyUI-Manager call, …) and for the
// gateway's own security events (lockouts, key reloads).
//
// A line names the key by its name and the client by its address. It never
// holds a key, a hash of one, a query string or a body.
package audit

import (
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"sync"
	"time"

	"github.com/comfygate/comfygate/internal/reqscope"
)

// Log writes audit lines. A nil *Log discards them.
type Log struct {
	mu sync.Mutex
	w  io.Writer
	c  io.Closer
}

// Open returns a Log appending to path (created 0600), or writing to
// fallback when path is empty (nil fallback: discard).
func Open(path string, fallback io.Writer) (*Log, error) {
	if path == "" {
		if fallback == nil {
			fallback = io.Discard
		}
		return &Log{w: fallback}, nil
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return nil, err
	}
	return &Log{w: f, c: f}, nil
}

// Close closes the file, if any.
func (l *Log) Close() error {
	if l == nil || l.c == nil {
		return nil
	}
	return l.c.Close()
}

// Event is one audit line.
type Event struct {
	Time     time.Time `json:"time"`
	Audit    string    `json:"audit"` // what happened: prompt, upload, interrupt, …, login, logout, lockout, key_reload
	Key      string    `json:"key,omitempty"`
	Client   string    `json:"client,omitempty"`
	Method   string    `json:"method,omitempty"`
	Route    string    `json:"route,omitempty"`
	Status   int       `json:"status,omitempty"`
	Outcome  string    `json:"outcome"` // ok, rejected, unauthorized, forbidden, rate_limited, locked_out, error; failed for a reload
	PromptID string    `json:"prompt_id,omitempty"`
	Detail   string    `json:"detail,omitempty"`
}

// Write records e, stamping its time if unset. Each event is one write of
// one line, so lines never interleave.
func (l *Log) Write(e Event) {
	if l == nil {
		return
	}
	if e.Time.IsZero() {
		e.Time = time.Now().UTC()
	}
	b, err := json.Marshal(e)
	if err != nil {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.w.Write(append(b, '\n'))
}

// Middleware audits every state-changing request (any method but GET, HEAD
// and OPTIONS; WebSocket upgrades are GETs), and GET /logout, which ends a
// session, after it is answered. It must
// sit inside requestlog.Middleware, whose scope it reads for the route, key
// name and client, and outside authentication, so refusals are audited too.
func (l *Log) Middleware() func(http.Handler) http.Handler {
	return func(next http.Handler) http.Handler {
		if l == nil {
			return next
		}
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			scope := reqscope.From(r.Context())
			kind := scope.Route.Kind
			switch r.Method {
			case http.MethodGet, http.MethodHead, http.MethodOptions:
				if kind != "logout" || r.Method != http.MethodGet {
					next.ServeHTTP(w, r)
					return
				}
			}
			cw := &captureWriter{ResponseWriter: w, keep: kind == "prompt"}
			next.ServeHTTP(cw, r)
			status := cw.status
			if status == 0 {
				status = http.StatusOK
			}
			e := Event{
				Audit:   kind,
				Key:     scope.KeyName,
				Client:  scope.Client.String(),
				Method:  r.Method,
				Route:   scope.Route.Label,
				Status:  status,
				Outcome: outcome(status, scope.AuthFailure),
			}
			if kind == "prompt" && status == http.StatusOK {
				var resp struct {
					PromptID string `json:"prompt_id"`
				}
				if json.Unmarshal(cw.body.Bytes(), &resp) == nil {
					e.PromptID = resp.PromptID
				}
			}
			l.Write(e)
		})
	}
}

func outcome(status int, authFailure string) string {
	switch {
	case authFailure == "locked_out":
		return "locked_out"
	case status == http.StatusUnauthorized:
		return "unauthorized"
	case status == http.StatusForbidden:
		return "forbidden"
	case status == http.StatusTooManyRequests:
		return "rate_limited"
	case status < 400:
		return "ok"
	case status < 500:
		return "rejected"
	}
	return "error"
}

// captureWriter notes the status and keeps up to 64 KiB of the body when
// keep is set (the POST /prompt answer, for its prompt_id).
type captureWriter struct {
	http.ResponseWriter
	keep   bool
	status int
	body   bytes.Buffer
}

func (c *captureWriter) WriteHeader(code int) {
	if c.status == 0 {
		c.status = code
	}
	c.ResponseWriter.WriteHeader(code)
}

func (c *captureWriter) Write(p []byte) (int, error) {
	if c.status == 0 {
		c.status = http.StatusOK
	}
	if c.keep && c.body.Len() < 64<<10 {
		c.body.Write(p[:min(len(p), 64<<10-c.body.Len())])
	}
	return c.ResponseWriter.Write(p)
}

func (c *captureWriter) Flush() { http.NewResponseController(c.ResponseWriter).Flush() }

func (c *captureWriter) Unwrap() http.ResponseWriter { return c.ResponseWriter }
