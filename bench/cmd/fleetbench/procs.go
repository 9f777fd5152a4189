package main

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// procs starts the processes of the benchmark and stops every one of them:
// each runs in a process group of its own, and the pid file lists the
// groups still running, so that bench/fleet.sh's exit trap can stop
// whatever is left if fleetbench itself is killed (and only that: a group
// is taken off the list once stopped, so an old id that the system gave
// to another process is never signalled).
type procs struct {
	dir string // logs and configurations
	reg *registry

	mu   sync.Mutex
	live map[int]*proc
}

// registry is the pid file, shared by the procs of every run.
type registry struct {
	path string
	mu   sync.Mutex
	pids map[int]bool
}

func (r *registry) set(pid int, live bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if live {
		r.pids[pid] = true
	} else {
		delete(r.pids, pid)
	}
	var b strings.Builder
	for p := range r.pids {
		fmt.Fprintln(&b, p)
	}
	tmp := r.path + ".new"
	if os.WriteFile(tmp, []byte(b.String()), 0o644) == nil {
		os.Rename(tmp, r.path)
	}
}

// sub returns procs that keep their logs in dir and share the pid file.
func (ps *procs) sub(dir string) *procs {
	return &procs{dir: dir, reg: ps.reg, live: map[int]*proc{}}
}

type proc struct {
	name string
	cmd  *exec.Cmd
	done chan struct{} // closed when it exited
}

func newProcs(dir string) (*procs, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	reg := &registry{path: filepath.Join(dir, "pids"), pids: map[int]bool{}}
	return &procs{dir: dir, reg: reg, live: map[int]*proc{}}, nil
}

// start runs name's command in the background, output to DIR/name.log.
func (ps *procs) start(name string, argv ...string) (*proc, error) {
	log, err := os.Create(filepath.Join(ps.dir, name+".log"))
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = log, log
	cmd.Env = append(os.Environ(), "GOMAXPROCS=1")
	detach(cmd)
	if err := cmd.Start(); err != nil {
		log.Close()
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	p := &proc{name: name, cmd: cmd, done: make(chan struct{})}
	go func() {
		cmd.Wait()
		log.Close()
		close(p.done)
	}()
	ps.mu.Lock()
	ps.live[cmd.Process.Pid] = p
	ps.mu.Unlock()
	ps.reg.set(cmd.Process.Pid, true)
	return p, nil
}

func (p *proc) pid() int { return p.cmd.Process.Pid }

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// kill sends SIGKILL to the process group (a server dying at once).
func (ps *procs) kill(p *proc) {
	signalGroup(p.pid(), syscall.SIGKILL)
	<-p.done
	ps.forget(p)
}

// stop asks the process group to stop (SIGTERM), and kills it after 3 s.
func (ps *procs) stop(p *proc) {
	signalGroup(p.pid(), syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(3 * time.Second):
	}
	// Children (nginx's workers) may outlive the leader for a moment.
	signalGroup(p.pid(), syscall.SIGKILL)
	<-p.done
	ps.forget(p)
}

func (ps *procs) forget(p *proc) {
	ps.mu.Lock()
	delete(ps.live, p.pid())
	ps.mu.Unlock()
	ps.reg.set(p.pid(), false)
}

// stopAll stops every process still running, at once.
func (ps *procs) stopAll() {
	ps.mu.Lock()
	var all []*proc
	for _, p := range ps.live {
		all = append(all, p)
	}
	ps.mu.Unlock()
	var wg sync.WaitGroup
	for _, p := range all {
		wg.Go(func() { ps.stop(p) })
	}
	wg.Wait()
}

// freePorts returns n free TCP ports on 127.0.0.1.
func freePorts(n int) ([]int, error) {
	var lns []net.Listener
	defer func() {
		for _, ln := range lns {
			ln.Close()
		}
	}()
	var ports []int
	for range n {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		lns = append(lns, ln)
		ports = append(ports, ln.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// waitHTTP waits until GET url answers 200, or p exits, or timeout.
func waitHTTP(ctx context.Context, p *proc, url string, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cl := &http.Client{Transport: &http.Transport{Proxy: nil}, Timeout: time.Second}
	defer cl.CloseIdleConnections()
	for {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if res, err := cl.Do(req); err == nil {
			res.Body.Close()
			if res.StatusCode == http.StatusOK {
				return nil
			}
		}
		if p != nil && p.exited() {
			return fmt.Errorf("%s exited before %s answered (see its log)", p.name, url)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: no 200 from %s within %s", p.name, url, timeout)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func addr(port int) string { return "127.0.0.1:" + strconv.Itoa(port) }
