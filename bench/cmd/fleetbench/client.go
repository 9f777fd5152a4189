package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/coder/websocket"

	"github.com/comfygate/comfygate/internal/comfytest"
)

// Outcome is what happened to one prompt, as its client saw it.
type Outcome struct {
	Job Job    `json:"job"`
	ID  string `json:"prompt_id,omitempty"`
	// Status is ok (the final image was downloaded), lost (queued, but
	// no image: the socket closed or the end signal never came), refused
	// (POST /prompt failed) or error (any other failed request).
	Status string `json:"status"`
	Err    string `json:"error,omitempty"`
	// Submit is when POST /prompt was sent, Done when the final image was
	// read (or the prompt given up), both Unix nanoseconds.
	Submit int64 `json:"submit_ns"`
	Done   int64 `json:"done_ns"`
}

// client sends prompts as a ComfyUI API client does (the websocket example
// of ComfyUI's script_examples): for each prompt, a fresh clientId and a
// socket /ws?clientId=..., then POST /prompt with that client_id, the
// socket read until the end signal (executing with node null for the
// prompt), GET /history/{id} and GET /view of the image it names.
//
// Each prompt is one session: the cookies a load balancer sets on the
// socket's handshake (its sticky-session cookie) are sent with the
// prompt's other requests, and forgotten afterwards, so the balancer
// chooses a server afresh for every prompt and keeps all of one prompt's
// requests on it.
type client struct {
	base    string // http://127.0.0.1:PORT
	http    *http.Client
	timeout time.Duration // per prompt
}

func newClient(base string, timeout time.Duration) *client {
	tr := &http.Transport{
		Proxy:               nil, // loopback only; never an environment proxy
		DialContext:         (&net.Dialer{Timeout: 5 * time.Second}).DialContext,
		MaxIdleConns:        256,
		MaxIdleConnsPerHost: 256,
		IdleConnTimeout:     30 * time.Second,
	}
	return &client{base: base, http: &http.Client{Transport: tr}, timeout: timeout}
}

func (c *client) close() { c.http.CloseIdleConnections() }

func newUUID() string {
	var b [16]byte
	rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:])
}

// session holds the cookies of one prompt's requests.
type session struct {
	cookies map[string]string
}

func (s *session) take(res *http.Response) {
	if res == nil {
		return
	}
	for _, ck := range res.Cookies() {
		s.cookies[ck.Name] = ck.Value
	}
}

func (s *session) header() http.Header {
	h := http.Header{}
	if len(s.cookies) > 0 {
		var parts []string
		for k, v := range s.cookies {
			parts = append(parts, (&http.Cookie{Name: k, Value: v}).String())
		}
		h.Set("Cookie", strings.Join(parts, "; "))
	}
	return h
}

// run sends one prompt and follows it to its image.
func (c *client) run(ctx context.Context, j Job) (o Outcome) {
	o.Job = j
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	defer func() { o.Done = time.Now().UnixNano() }()
	sess := &session{cookies: map[string]string{}}
	clientID := newUUID()

	wsURL := "ws" + strings.TrimPrefix(c.base, "http") + "/ws?clientId=" + clientID
	o.Submit = time.Now().UnixNano()
	conn, res, err := websocket.Dial(ctx, wsURL, &websocket.DialOptions{
		HTTPClient: c.http, HTTPHeader: sess.header(), CompressionMode: websocket.CompressionDisabled,
	})
	if err != nil {
		o.Status, o.Err = "refused", "socket: "+err.Error()
		return o
	}
	defer conn.CloseNow()
	conn.SetReadLimit(16 << 20)
	sess.take(res)

	body, _ := json.Marshal(map[string]any{"prompt": comfytest.Txt2Img(j.Checkpoint, j.Steps), "client_id": clientID})
	var queued struct {
		PromptID string `json:"prompt_id"`
	}
	o.Submit = time.Now().UnixNano()
	if err := c.do(ctx, sess, http.MethodPost, "/prompt", body, &queued); err != nil {
		o.Status, o.Err = "refused", "POST /prompt: "+err.Error()
		return o
	}
	if queued.PromptID == "" {
		o.Status, o.Err = "refused", "POST /prompt: no prompt_id in the answer"
		return o
	}
	o.ID = queued.PromptID

	if err := waitEnd(ctx, conn, o.ID); err != nil {
		o.Status, o.Err = "lost", "socket: "+err.Error()
		return o
	}
	var hist map[string]struct {
		Outputs map[string]struct {
			Images []struct {
				Filename  string `json:"filename"`
				Subfolder string `json:"subfolder"`
				Type      string `json:"type"`
			} `json:"images"`
		} `json:"outputs"`
	}
	if err := c.do(ctx, sess, http.MethodGet, "/history/"+url.PathEscape(o.ID), nil, &hist); err != nil {
		o.Status, o.Err = "error", "GET /history: "+err.Error()
		return o
	}
	h, ok := hist[o.ID]
	if !ok {
		o.Status, o.Err = "lost", "GET /history: the prompt is not in it"
		return o
	}
	var images int
	for _, out := range h.Outputs {
		for _, img := range out.Images {
			q := url.Values{"filename": {img.Filename}, "subfolder": {img.Subfolder}, "type": {img.Type}}
			if err := c.view(ctx, sess, "/view?"+q.Encode()); err != nil {
				o.Status, o.Err = "error", "GET /view: "+err.Error()
				return o
			}
			images++
		}
	}
	if images == 0 {
		o.Status, o.Err = "error", "GET /history: no image in the outputs"
		return o
	}
	conn.Close(websocket.StatusNormalClosure, "")
	o.Status = "ok"
	return o
}

// waitEnd reads the socket until the end signal of prompt id: "executing"
// with node null (ComfyUI's last message of a prompt). An execution_error
// or _interrupted for the prompt is an error.
func waitEnd(ctx context.Context, conn *websocket.Conn, id string) error {
	for {
		typ, data, err := conn.Read(ctx)
		if err != nil {
			return err
		}
		if typ != websocket.MessageText {
			continue // previews
		}
		var msg struct {
			Type string `json:"type"`
			Data struct {
				PromptID string           `json:"prompt_id"`
				Node     *json.RawMessage `json:"node"`
			} `json:"data"`
		}
		if json.Unmarshal(data, &msg) != nil || msg.Data.PromptID != id {
			continue
		}
		switch msg.Type {
		case "executing":
			if msg.Data.Node == nil || string(*msg.Data.Node) == "null" {
				return nil
			}
		case "execution_error", "execution_interrupted":
			return errors.New(msg.Type)
		}
	}
}

// do sends one request with the session's cookies and decodes a 200 JSON
// answer into v.
func (c *client) do(ctx context.Context, sess *session, method, path string, body []byte, v any) error {
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header = sess.header()
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	res, err := c.http.Do(req)
	if err != nil {
		return err
	}
	defer res.Body.Close()
	sess.take(res)
	b, err := io.ReadAll(io.LimitReader(res.Body, 16<<20))
	if err != nil {
		return err
	}
	if res.StatusCode != http.StatusOK {
		return fmt.Errorf("status %d: %.200s", res.StatusCode, b)
	}
	return json.Unmarshal(b, v)
}

// view downloads an image and checks it is not empty.
func (c *client) view(ctx context.Context, sess *session, path string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.base+path, nil)
	if err != nil {
		return err
	}
	req.Header = sess.header()
	res, err := c.http.Do(req)
	if err != nil {
		return err
	}
	defer res.Body.Close()
	sess.take(res)
	n, err := io.Copy(io.Discard, io.LimitReader(res.Body, 64<<20))
	if err != nil {
		return err
	}
	if res.StatusCode != http.StatusOK {
		return fmt.Errorf("status %d", res.StatusCode)
	}
	if n == 0 {
		return errors.New("empty image")
	}
	return nil
}
