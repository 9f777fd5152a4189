package main

import (
	"context"
	"encoding/binary"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/coder/websocket"
)

// The fake ComfyUI. It does as little work as a server can, so that what the
// load client sees on top of "direct" is the proxy's cost.

const smallPromptJSON = `{"exec_info": {"queue_remaining": 0}}`

// ViewSize is the size of the /api/view?filename=big download.
const ViewSize = 8 << 20

// Burst shape: text messages, and one binary frame after every
// burstTextPerBinary text messages.
const (
	burstText          = 1000
	burstBinary        = 100
	burstBinarySize    = 64 << 10
	burstTextPerBinary = burstText / burstBinary
)

func runUpstream(args []string) error {
	fs := flag.NewFlagSet("upstream", flag.ContinueOnError)
	listen := fs.String("listen", "127.0.0.1:8189", "loopback address to listen on")
	lifetime := fs.Duration("max-lifetime", 30*time.Minute, "exit after this long whatever happens")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if err := checkLoopback(*listen); err != nil {
		return err
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	view := make([]byte, ViewSize)
	for i := range view {
		view[i] = byte(i * 7)
	}
	var promptN atomic.Int64
	mux := http.NewServeMux()
	prompt := func(w http.ResponseWriter, r *http.Request) {
		sawKey(w, r)
		switch r.Method {
		case http.MethodGet, http.MethodHead:
			w.Header().Set("Content-Type", "application/json; charset=utf-8")
			w.Header().Set("Content-Length", strconv.Itoa(len(smallPromptJSON)))
			io.WriteString(w, smallPromptJSON)
		case http.MethodPost:
			n, _ := io.Copy(io.Discard, r.Body)
			id := promptN.Add(1)
			body := fmt.Sprintf(`{"prompt_id": "00000000-0000-4000-8000-%012d", "number": %d, "node_errors": {}, "bytes": %d}`, id, id, n)
			w.Header().Set("Content-Type", "application/json; charset=utf-8")
			w.Header().Set("Content-Length", strconv.Itoa(len(body)))
			io.WriteString(w, body)
		default:
			http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		}
	}
	mux.HandleFunc("/api/prompt", prompt)
	mux.HandleFunc("/prompt", prompt)
	viewH := func(w http.ResponseWriter, r *http.Request) {
		sawKey(w, r)
		if r.URL.Query().Get("filename") != "big" {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Type", "image/png")
		w.Header().Set("Content-Length", strconv.Itoa(len(view)))
		w.Write(view)
	}
	mux.HandleFunc("/api/view", viewH)
	mux.HandleFunc("/view", viewH)
	mux.HandleFunc("/ws", serveWS)
	mux.HandleFunc("/api/ws", serveWS)

	srv := &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       5 * time.Minute,
		ErrorLog:          nil,
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	go func() {
		select {
		case <-ctx.Done():
		case <-time.After(*lifetime):
		}
		srv.Close()
	}()
	fmt.Fprintf(os.Stderr, "comfybench upstream listening on http://%s\n", ln.Addr())
	if err := srv.Serve(ln); err != nil && err != http.ErrServerClosed {
		return err
	}
	return nil
}

// sawKey tells the load client whether a credential reached the upstream: a
// key-checking proxy must remove it, as comfygate does.
func sawKey(w http.ResponseWriter, r *http.Request) {
	if r.Header.Get("Authorization") != "" || r.Header.Get("X-Api-Key") != "" {
		w.Header().Set("X-Upstream-Saw-Key", "yes")
	}
}

// serveWS accepts a WebSocket and answers its text messages:
//
//	"burst"   1000 text messages and 100 binary 64 KiB frames, interleaved,
//	          each stamped with its send time, then {"type":"done"}
//	anything else is echoed.
//
// An idle connection just waits in Read, as a ComfyUI client between prompts.
func serveWS(w http.ResponseWriter, r *http.Request) {
	c, err := websocket.Accept(w, r, &websocket.AcceptOptions{
		InsecureSkipVerify: true,
		CompressionMode:    websocket.CompressionDisabled,
	})
	if err != nil {
		return
	}
	defer c.CloseNow()
	c.SetReadLimit(1 << 20)
	ctx := context.Background()
	bin := make([]byte, burstBinarySize)
	for i := range bin {
		bin[i] = byte(i)
	}
	// ComfyUI's binary preview header: event type 1 (PREVIEW_IMAGE), format 2 (PNG).
	binary.BigEndian.PutUint32(bin[0:4], 1)
	binary.BigEndian.PutUint32(bin[4:8], 2)
	var text []byte
	for range 1 << 20 { // bounded: at most 1M messages per connection
		typ, msg, err := c.Read(ctx)
		if err != nil {
			return
		}
		if typ != websocket.MessageText || !strings.HasPrefix(string(msg), "burst") {
			if c.Write(ctx, typ, msg) != nil {
				return
			}
			continue
		}
		for i := range burstText {
			text = text[:0]
			text = append(text, `{"t":`...)
			text = strconv.AppendInt(text, time.Now().UnixNano(), 10)
			text = append(text, `,"type":"progress","data":{"value":`...)
			text = strconv.AppendInt(text, int64(i), 10)
			text = append(text, `,"max":1000,"prompt_id":"00000000-0000-4000-8000-000000000001","node":"3"}}`...)
			if c.Write(ctx, websocket.MessageText, text) != nil {
				return
			}
			if (i+1)%burstTextPerBinary == 0 {
				binary.BigEndian.PutUint64(bin[8:16], uint64(time.Now().UnixNano()))
				if c.Write(ctx, websocket.MessageBinary, bin) != nil {
					return
				}
			}
		}
		if c.Write(ctx, websocket.MessageText, []byte(`{"t":0,"type":"done"}`)) != nil {
			return
		}
	}
}
