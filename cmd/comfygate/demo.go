package main

import (
	"context"
	_ "embed"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/pflag"

	"github.com/comfygate/comfygate/internal/auth"
	"github.com/comfygate/comfygate/internal/comfytest"
	"github.com/comfygate/comfygate/internal/config"
	"github.com/comfygate/comfygate/internal/route"
	"github.com/comfygate/comfygate/internal/server"
)

// demoWorkflow is examples/workflow_api.json (a test keeps the copy equal):
// a /prompt body that needs no model.
//
//go:embed demo_workflow.json
var demoWorkflow []byte

// defaultDemoListen is where the demo's gateway listens unless --listen says
// otherwise: ComfyUI's usual address, as in real use. A variable so that a
// test can make it busy.
var defaultDemoListen = "127.0.0.1:8188"

// demoSimVersion is the ComfyUI version the simulator reports, as
// cmd/comfyui-sim does.
const demoSimVersion = "0.8.0"

const demoUsage = `Usage:
  comfygate demo [--listen HOST:PORT]

Starts a SIMULATED ComfyUI (no GPU, no models: it generates nothing real)
and comfygate in front of it with a fresh random API key, all in this one
process, and prints what to try. Ctrl-C stops both and deletes the demo's
temporary files.

  --listen HOST:PORT   where comfygate listens (default 127.0.0.1:8188; if
                       that port is taken, a free one is used instead;
                       port 0 always picks a free one)

The demo ignores COMFYGATE_* variables, and refuses --upstream, --api-key,
--api-key-file and their variables: those are for real use, in front of a
real ComfyUI (see comfygate --help).
`

// demoRefusedFlags are the flags of real use that would make the demo
// something it is not: another ComfyUI, or a key the demo did not make.
var demoRefusedFlags = []string{"upstream", "upstreams-file", "api-key", "api-key-file"}

// runDemo is "comfygate demo": a simulated ComfyUI on a free loopback port,
// comfygate in front of it with a new key, until ctx is done.
func runDemo(ctx context.Context, args, environ []string, stdout, stderr io.Writer) error {
	fs := pflag.NewFlagSet("demo", pflag.ContinueOnError)
	fs.SetOutput(io.Discard)
	listen := fs.String("listen", defaultDemoListen, "")
	help := fs.BoolP("help", "h", false, "")
	for _, name := range demoRefusedFlags {
		fs.String(name, "", "") // known, so that they are refused with a reason below
	}
	if err := fs.Parse(args); err != nil {
		return demoUsageError(stderr, err.Error())
	}
	if *help {
		fmt.Fprint(stdout, demoUsage)
		return nil
	}
	if fs.NArg() > 0 {
		return demoUsageError(stderr, fmt.Sprintf("unexpected argument %q", fs.Arg(0)))
	}

	// Real-use settings stop the demo: whoever set them expects a real
	// ComfyUI or their own key, and would get neither.
	var refused, ignored []string
	for _, name := range demoRefusedFlags {
		if fs.Changed(name) {
			refused = append(refused, "--"+name)
		}
	}
	for _, kv := range environ {
		name, _, _ := strings.Cut(kv, "=")
		if !strings.HasPrefix(strings.ToUpper(name), config.EnvPrefix) {
			continue
		}
		isRefused := false
		for _, flag := range demoRefusedFlags {
			if strings.EqualFold(name, config.EnvName(flag)) {
				isRefused = true
			}
		}
		if isRefused {
			refused = append(refused, name)
		} else {
			ignored = append(ignored, name)
		}
	}
	if len(refused) > 0 {
		fmt.Fprintf(stderr, "comfygate demo: refusing to start: %s set.\n"+
			"The demo runs its own SIMULATED ComfyUI with a key it makes itself, so it takes\n"+
			"neither an upstream nor a key. For real use, in front of ComfyUI:\n"+
			"  comfygate --upstream http://127.0.0.1:8189 --api-key-file keys.txt\n"+
			"To run the demo, drop %s (unset the variables).\n",
			strings.Join(refused, ", "), strings.Join(refused, ", "))
		return errUsage
	}

	// Where the gateway listens. The default port may be taken (often by
	// ComfyUI itself): the demo then takes any free port and says so,
	// since its point is to work on its own; a port asked for explicitly
	// must be that port.
	host, port, err := net.SplitHostPort(*listen)
	if err != nil {
		return demoUsageError(stderr, fmt.Sprintf("--listen %q: want HOST:PORT, e.g. 127.0.0.1:8188 (port 0: any free port)", *listen))
	}
	var notes []string
	ln, err := net.Listen("tcp", net.JoinHostPort(host, port))
	if err != nil && !fs.Changed("listen") {
		notes = append(notes, fmt.Sprintf("%s is not available (%v): is ComfyUI or another comfygate running there? The demo uses a free port instead.",
			*listen, unwrapOpError(err)))
		ln, err = net.Listen("tcp", net.JoinHostPort(host, "0"))
	}
	if err != nil {
		return fmt.Errorf("demo: cannot listen on %s: %v; pick another address, e.g. --listen 127.0.0.1:0 for any free port", *listen, unwrapOpError(err))
	}
	defer ln.Close()
	gwPort := ln.Addr().(*net.TCPAddr).Port

	// The simulated ComfyUI, on its own free loopback port.
	simLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return fmt.Errorf("demo: starting the simulator: %w", err)
	}
	fake := comfytest.NewFake(comfytest.Options{Version: demoSimVersion})
	simSrv := &http.Server{Handler: fake, ReadHeaderTimeout: 10 * time.Second}
	simDone := make(chan struct{})
	go func() {
		defer close(simDone)
		simSrv.Serve(simLn) // returns at Shutdown
	}()
	defer func() {
		shCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		fake.Close() // its WebSockets are hijacked, so Shutdown does not close them
		simSrv.Shutdown(shCtx)
		<-simDone
	}()
	simURL := "http://" + simLn.Addr().String()

	// A fresh key. The file holds only its hash, in a directory of its own
	// that is removed on the way out; the key itself is printed once.
	dir, err := os.MkdirTemp("", "comfygate-demo-")
	if err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	defer os.RemoveAll(dir)
	secret := auth.NewSecret()
	keyFile := filepath.Join(dir, "keys.txt")
	keyLine := "# comfygate demo: the hash of the key printed on the terminal\n" + auth.KeyLine("demo", secret, route.ScopeAdmin) + "\n"
	if err := os.WriteFile(keyFile, []byte(keyLine), 0o600); err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	workflow := filepath.Join(dir, "workflow_api.json")
	if err := os.WriteFile(workflow, demoWorkflow, 0o644); err != nil {
		return fmt.Errorf("demo: %w", err)
	}

	// comfygate, configured as from the command line, but from these
	// arguments only: the environment is not consulted.
	cfg, err := config.Load([]string{
		"--listen", host,
		"--port", strconv.Itoa(gwPort),
		"--upstream", simURL,
		"--api-key-file", keyFile,
		"--log-format", "text",
		"--shutdown-timeout", "5s",
	}, func(string) (string, bool) { return "", false })
	if err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	logger := newLogger(cfg, stderr)
	for _, w := range cfg.Warnings {
		logger.Warn(w)
	}
	srv, err := server.New(cfg, logger, Version(), stderr)
	if err != nil {
		return fmt.Errorf("demo: %w", err)
	}

	urlHost := host
	if ip := net.ParseIP(host); host == "" || ip != nil && ip.IsUnspecified() {
		urlHost = "127.0.0.1"
	}
	base := "http://" + net.JoinHostPort(urlHost, strconv.Itoa(gwPort))
	for _, n := range ignored {
		notes = append(notes, fmt.Sprintf("%s is set; the demo ignores COMFYGATE_* variables.", n))
	}
	printDemo(stdout, demoInfo{base: base, sim: simURL, key: secret, workflow: workflow, dir: dir, notes: notes})

	err = srv.Serve(ctx, []net.Listener{ln}, nil)
	fmt.Fprintf(stdout, "\ncomfygate demo stopped; removed %s\n", dir)
	return err
}

type demoInfo struct {
	base, sim, key, workflow, dir string
	notes                         []string
}

// printDemo writes the instructions. demo_test.go reads them back and
// follows them, so their shape is tested: keep "API key", the curl lines and
// the last line parseable.
func printDemo(w io.Writer, d demoInfo) {
	bearer := `-H "Authorization: Bearer ` + d.key + `"`
	data := `--data-binary "@` + d.workflow + `"`
	fmt.Fprintf(w, `
  ********************************************************************
  *  comfygate DEMO. This is a SIMULATION: the ComfyUI behind this    *
  *  gateway is a simulator with no GPU and no models. It answers     *
  *  like ComfyUI but generates nothing real.                         *
  ********************************************************************

  comfygate   %s   (checks the key, then forwards)
  ComfyUI     %s   (SIMULATED, loopback only)
  API key     %s
              (made just now; it works until you stop the demo)

Try it:
  In a browser, sign in with the key, then use the (simulated) web UI:
    %s/login
  Queue the example workflow; the answer holds a prompt_id:
    curl %s -H "Content-Type: application/json" %s %s/prompt
  The same without the key gets 401:
    curl -i -H "Content-Type: application/json" %s %s/prompt
  Health, without a key:
    curl %s/health
  Prometheus metrics, with the key:
    curl %s %s/metrics

Real use, in front of your ComfyUI (moved to port 8189):
  python main.py --listen 127.0.0.1 --port 8189
  comfygate keys new me              # prints a key, and its line for keys.txt
  comfygate --upstream http://127.0.0.1:8189 --api-key-file keys.txt

`, d.base, d.sim, d.key, d.base, bearer, data, d.base, data, d.base, d.base, bearer, d.base)
	for _, n := range d.notes {
		fmt.Fprintf(w, "Note: %s\n", n)
	}
	fmt.Fprintf(w, "Press Ctrl-C to stop the demo; it then deletes %s\n\n", d.dir)
}

func demoUsageError(w io.Writer, msg string) error {
	fmt.Fprintf(w, "comfygate demo: %s\n\n%s", msg, demoUsage)
	return errUsage
}

// unwrapOpError drops the "listen tcp ADDR:" prefix that the caller's
// message already gives.
func unwrapOpError(err error) error {
	var oe *net.OpError
	if errors.As(err, &oe) && oe.Err != nil {
		return oe.Err
	}
	return err
}
