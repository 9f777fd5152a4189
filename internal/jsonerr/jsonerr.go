// Package jsonerr writes the small JSON error bodies that comfygate sends to
// clients. Every error the gateway produces itself goes through here, so the
// shape is the same everywhere: {"error": "<code>", "message": "<text>"}.
//
// The message is written for the client and must never contain a credential,
// an upstream address or other internal detail; those belong in the logs.
package jsonerr

import (
	"bytes"
	"encoding/json"
	"net/http"
	"strconv"
	"time"
)

// Body is the JSON document sent with every gateway-made error.
type Body struct {
	// Error is a short machine-readable code such as "unauthorized".
	Error string `json:"error"`
	// Message is a human-readable sentence that is safe to show anyone.
	Message string `json:"message"`
}

// Write sends status with a JSON Body. Headers already set on w (such as
// WWW-Authenticate or Retry-After) are kept.
func Write(w http.ResponseWriter, status int, code, message string) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false) // messages say <key>, not \u003ckey\u003e
	enc.Encode(Body{Error: code, Message: message})
	h := w.Header()
	h.Set("Content-Type", "application/json; charset=utf-8")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Cache-Control", "no-store")
	// A known length lets a refusal be flushed whole before its
	// connection is closed (see server's lingering close).
	h.Set("Content-Length", strconv.Itoa(buf.Len()))
	w.WriteHeader(status)
	w.Write(buf.Bytes())
}

// SetRetryAfter sets Retry-After to d in whole seconds, rounded up, at least 1.
func SetRetryAfter(h http.Header, d time.Duration) {
	h.Set("Retry-After", strconv.Itoa(max(int((d+time.Second-1)/time.Second), 1)))
}
