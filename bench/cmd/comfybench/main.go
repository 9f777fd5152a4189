// Command comfybench is the benchmark harness of bench/run.sh: a fast fake
// ComfyUI upstream, a load client that measures every target side by side,
// and the report writer for docs/benchmarks.md and docs/benchmarks.svg.
//
//	comfybench upstream --listen 127.0.0.1:PORT
//	comfybench load --upstream-pid PID --target name=...,url=...,pid=... --out results.json
//	comfybench report --in results.json --md docs/benchmarks.md --svg docs/benchmarks.svg
//	comfybench freeport -n 9
//	comfybench wait --timeout 10s 127.0.0.1:PORT ...
//
// It uses only the standard library and github.com/coder/websocket, listens
// and connects on loopback only, and every loop is bounded in count and time.
package main

import (
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		usage()
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "upstream":
		err = runUpstream(os.Args[2:])
	case "load":
		err = runLoad(os.Args[2:])
	case "report":
		err = runReport(os.Args[2:])
	case "freeport":
		err = runFreeport(os.Args[2:])
	case "wait":
		err = runWait(os.Args[2:])
	case "-h", "--help", "help":
		usage()
		return
	default:
		usage()
		os.Exit(2)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "comfybench:", err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, `usage: comfybench upstream|load|report|freeport|wait [flags]
  upstream --listen 127.0.0.1:PORT       fast fake ComfyUI (GET/POST /api/prompt, /api/view, /ws)
  load --target name=N,kind=K,url=U[,pid=P][,auth=1] ... --out FILE
  report --in FILE --md FILE --svg FILE
  freeport -n N                          print N free 127.0.0.1 ports
  wait [--timeout D] ADDR...             wait until every ADDR accepts TCP connections`)
}

// checkLoopback refuses any address that is not on the loopback interface.
func checkLoopback(hostport string) error {
	host, _, err := net.SplitHostPort(hostport)
	if err != nil {
		return err
	}
	ip := net.ParseIP(host)
	if ip == nil || !ip.IsLoopback() {
		return fmt.Errorf("%s: only loopback addresses are allowed", hostport)
	}
	return nil
}

func runFreeport(args []string) error {
	fs := flag.NewFlagSet("freeport", flag.ContinueOnError)
	n := fs.Int("n", 1, "how many ports")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *n < 1 || *n > 100 {
		return errors.New("-n must be 1..100")
	}
	var lns []net.Listener
	var ports []string
	for range *n {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return err
		}
		lns = append(lns, ln)
		ports = append(ports, strconv.Itoa(ln.Addr().(*net.TCPAddr).Port))
	}
	for _, ln := range lns {
		ln.Close()
	}
	fmt.Println(strings.Join(ports, " "))
	return nil
}

func runWait(args []string) error {
	fs := flag.NewFlagSet("wait", flag.ContinueOnError)
	timeout := fs.Duration("timeout", 10*time.Second, "give up after")
	pid := fs.Int("pid", 0, "give up at once if this process exits")
	if err := fs.Parse(args); err != nil {
		return err
	}
	deadline := time.Now().Add(*timeout)
	for _, addr := range fs.Args() {
		if err := checkLoopback(addr); err != nil {
			return err
		}
		for {
			c, err := net.DialTimeout("tcp", addr, 500*time.Millisecond)
			if err == nil {
				c.Close()
				break
			}
			if *pid > 0 && !alive(*pid) {
				return fmt.Errorf("process %d exited before %s accepted connections", *pid, addr)
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("%s not accepting connections after %s", addr, *timeout)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	return nil
}

// alive reports whether pid exists and is not a zombie.
func alive(pid int) bool {
	f := statFields(pid)
	return len(f) > 0 && f[0] != "Z"
}
