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
	"strings"
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
	count := fs.Int("count", 1, "how many simulated servers to start, on --port and the ports after it (a fleet to try comfygate's fleet mode)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *count < 1 || *count > 64 {
		return fmt.Errorf("--count must be between 1 and 64, got %d", *count)
	}

	fmt.Fprintf(stdout, "comfyui-sim: a SIMULATOR of ComfyUI for trying comfygate. This is NOT ComfyUI: it runs no models.\n")
	type sim struct {
		fake *comfytest.Fake
		srv  *http.Server
	}
	var (
		sims      []sim
		upstreams []string
	)
	defer func() {
		for _, s := range sims {
			s.fake.Close()
		}
	}()
	errc := make(chan error, *count)
	for i := range *count {
		ln, err := net.Listen("tcp", net.JoinHostPort(*listen, strconv.Itoa(*port+i)))
		if err != nil {
			return err
		}
		// The simulator reports the newest ComfyUI it was checked against
		// (internal/comfytest/testdata/newest_*), so /health shows what the
		// README shows, rather than the "unknown" of the v0.3.7 capture.
		fake := comfytest.NewFake(comfytest.Options{Version: "0.8.0"})
		fake.SetNodeDelay(*nodeDelay)
		srv := &http.Server{Handler: fake, ReadHeaderTimeout: 10 * time.Second}
		sims = append(sims, sim{fake, srv})
		fmt.Fprintf(stdout, "comfyui-sim: listening on http://%s/ (Ctrl-C to stop)\n", ln.Addr())
		upstreams = append(upstreams, fmt.Sprintf("--upstream sim%d=http://%s", i+1, ln.Addr()))
		go func() { errc <- srv.Serve(ln) }()
	}
	if *count > 1 {
		fmt.Fprintf(stdout, "comfyui-sim: run comfygate in front of them with: comfygate %s\n", strings.Join(upstreams, " "))
	}
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	fmt.Fprintln(stdout, "comfyui-sim: shutting down")
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var errs []error
	for _, s := range sims {
		s.fake.Close() // WebSockets are hijacked, so Shutdown does not close them
		errs = append(errs, s.srv.Shutdown(shutdownCtx))
	}
	return errors.Join(errs...)
}
