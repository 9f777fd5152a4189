// Command comfyui-sim serves a simulator of ComfyUI, so that comfygate can
// be tried without a GPU or a real ComfyUI install. It is the fake of
// internal/comfytest behind a real listener, answering as ComfyUI 0.8.0
// does (client-chosen prompt ids, progress_state messages, create_time).
//
// With --step-time, --model-load-time, --models and --classes each server
// behaves like a GPU box for the fleet benchmark (bench/): one prompt at a
// time, a run time of steps x --step-time per KSampler, a model-load time
// when a prompt needs another checkpoint, and its own models and nodes.
// --stats adds GET /sim/stats, a JSON snapshot of what the server ran.
package main

import (
	"context"
	"encoding/json"
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
	stepTime := fs.Duration("step-time", 0, "how long each step of a KSampler takes (a prompt then runs steps x this per KSampler, e.g. 50ms); 0: KSampler takes --node-delay like any node")
	loadTime := fs.Duration("model-load-time", 0, "how long loading a checkpoint takes, paid when a prompt needs another checkpoint than the one loaded (e.g. 5s)")
	models := fs.StringArray("models", nil, "model files of a folder, FOLDER=FILE,FILE (repeat it, or separate folders with ;), e.g. checkpoints=sd15.safetensors,sdxl.safetensors; they are the loaders' choices")
	classes := fs.StringSlice("classes", nil, "the only node classes the server has, comma-separated (default: the 243 of ComfyUI v0.3.7)")
	stats := fs.Bool("stats", false, "serve GET /sim/stats: a JSON snapshot of model loads, busy time, the queue and every prompt run")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *count < 1 || *count > 64 {
		return fmt.Errorf("--count must be between 1 and 64, got %d", *count)
	}
	modelMap, err := parseModels(*models)
	if err != nil {
		return err
	}
	if *stepTime < 0 || *loadTime < 0 || *nodeDelay < 0 {
		return errors.New("--node-delay, --step-time and --model-load-time must not be negative")
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
		// The simulator behaves as the newest ComfyUI it was checked against
		// (internal/comfytest/testdata/newest_*, internal/realcomfy), 0.8.0.
		fake := comfytest.NewFake(comfytest.Options{
			Version: "0.8.0", PromptIDs: true, ProgressState: true, CreateTime: true,
			Classes: *classes, Models: modelMap, StepTime: *stepTime, ModelLoadTime: *loadTime,
		})
		fake.SetNodeDelay(*nodeDelay)
		var h http.Handler = fake
		if *stats {
			h = withStats(fake)
		}
		srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
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

// parseModels reads the --models flags: FOLDER=FILE,FILE, several folders
// separated by ";".
func parseModels(flags []string) (map[string][]string, error) {
	if len(flags) == 0 {
		return nil, nil
	}
	m := map[string][]string{}
	for _, f := range flags {
		for part := range strings.SplitSeq(f, ";") {
			part = strings.TrimSpace(part)
			if part == "" {
				continue
			}
			folder, files, ok := strings.Cut(part, "=")
			folder = strings.TrimSpace(folder)
			if !ok || folder == "" || strings.ContainsAny(folder, "/\\") {
				return nil, fmt.Errorf("--models: want FOLDER=FILE,FILE, got %q", part)
			}
			for file := range strings.SplitSeq(files, ",") {
				if file = strings.TrimSpace(file); file != "" {
					m[folder] = append(m[folder], file)
				}
			}
			if m[folder] == nil {
				m[folder] = []string{}
			}
		}
	}
	return m, nil
}

// withStats serves GET /sim/stats (comfytest.Stats as JSON) in front of
// the fake. The path is not a ComfyUI route, so it hides nothing.
func withStats(f *comfytest.Fake) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/sim/stats" {
			f.ServeHTTP(w, r)
			return
		}
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			w.Header().Set("Allow", "GET, HEAD")
			http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
			return
		}
		b, err := json.Marshal(f.Stats())
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		w.Write(b)
	})
}
