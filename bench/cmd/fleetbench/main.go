// Command fleetbench is the fleet benchmark of bench/fleet.sh. It starts
// simulated GPU servers (cmd/comfyui-sim with --step-time,
// --model-load-time and --stats, one process each), puts each target in
// front of them in turn (comfygate's fleet mode, nginx round robin and
// least_conn, HAProxy leastconn, or one server reached directly), sends
// the same workload of prompts through it as ComfyUI API clients do,
// kills one server halfway through in the failover runs, and writes the
// figures to a results file and docs/fleet-benchmarks.md with its chart.
//
//	fleetbench run --sim BIN --comfygate BIN [--nginx BIN] [--haproxy BIN] --dir DIR --out results.json [--quick]
//	fleetbench report --in results.json --md docs/fleet-benchmarks.md --svg docs/fleet-benchmarks.svg [--notes FILE]
//
// Everything listens and connects on 127.0.0.1 only; every process it
// starts runs in its own process group, is listed in DIR/pids, and is
// stopped when the run ends (and killed by the kernel if fleetbench dies).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:])
	stop()
	if errors.Is(err, flag.ErrHelp) {
		return
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "fleetbench:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string) error {
	if len(args) == 0 {
		usage()
		return errors.New("no command")
	}
	switch args[0] {
	case "run":
		return runBench(ctx, args[1:])
	case "report":
		return runReport(args[1:])
	case "-h", "--help", "help":
		usage()
		return nil
	}
	usage()
	return fmt.Errorf("unknown command %q", args[0])
}

func usage() {
	fmt.Fprintln(os.Stderr, `usage: fleetbench run|report [flags]   (fleetbench run -h for the flags)
  run     start simulated servers and each target, send the workload, write results JSON
  report  write the Markdown page and the SVG chart from a results file`)
}
