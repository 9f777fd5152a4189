// Command comfyui-sim serves a simulator of ComfyUI, so that comfygate can
// be tried without a GPU or a real ComfyUI install. It is the fake of
// internal/comfytest behind a real listener.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"github.com/comfygate/comfygate/internal/comfytest"
	"github.com/spf13/pflag"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	if errors.Is(err, pflag.ErrHelp) {
		return
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "comfyui-sim:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := pflag.NewFlagSet("comfyui-sim", pflag.ContinueOnError)
	fs.SetOutput(stderr)
	listen := fs.String("listen", "127.0.0.1", "IP address to listen on")
	port := fs.Int("port", 8189, "TCP port to listen on (real ComfyUI uses 8188)")
	nodeDelay := fs.Duration("node-delay", 0, "how long each node of a prompt \"runs\", so that a queue builds up (e.g. 2s)")
	if err := fs.Parse(args); err != nil {
		return err
	}

	ln, err := net.Listen("tcp", net.JoinHostPort(*listen, strconv.Itoa(*port)))
	if err != nil {
		return err
	}
	// The simulator reports the newest ComfyUI it was checked against
	// (internal/comfytest/testdata/newest_*), so /health shows what the
	// README shows, rather than the "unknown" of the v0.3.7 capture.
	fake := comfytest.NewFake(comfytest.Options{Version: "0.8.0"})
	defer fake.Close()
	fake.SetNodeDelay(*nodeDelay)
	srv := &http.Server{Handler: fake, ReadHeaderTimeout: 10 * time.Second}

	fmt.Fprintf(stdout, "comfyui-sim: a SIMULATOR of ComfyUI for trying comfygate. This is NOT ComfyUI: it runs no models.\n")
	fmt.Fprintf(stdout, "comfyui-sim: listening on http://%s/ (Ctrl-C to stop)\n", ln.Addr())

	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	fmt.Fprintln(stdout, "comfyui-sim: shutting down")
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	fake.Close() // WebSockets are hijacked, so Shutdown does not close them
	return srv.Shutdown(shutdownCtx)
}
