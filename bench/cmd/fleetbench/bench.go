package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// The targets, in the order the page lists them.
var allTargets = []string{"comfygate", "nginx-rr", "nginx-lc", "haproxy-lc", "direct"}

// targetInfo describes a target for the page.
var targetInfo = map[string]string{
	"comfygate":  "comfygate fleet mode (`--upstream NAME=URL` per server; one server: single-server pass-through)",
	"nginx-rr":   "nginx round robin, sticky cookie per prompt",
	"nginx-lc":   "nginx `least_conn`, sticky cookie per prompt",
	"haproxy-lc": "HAProxy `balance leastconn`, `cookie insert` per prompt",
	"direct":     "one server, no proxy (the baseline)",
}

// bench runs the scenarios.
type bench struct {
	cfg Config
	ps  *procs
	log *log.Logger
	seq int // runs started, for unique names
}

// Config is what the run measures and with what.
type Config struct {
	Sim, Gateway, Nginx, HAProxy string        `json:"-"` // binaries
	Dir                          string        `json:"-"`
	Quick                        bool          `json:"quick"`
	Servers                      []int         `json:"servers"`
	Targets                      []string      `json:"targets"`
	PerServer                    int           `json:"prompts_per_server"`
	ClientsPerServer             int           `json:"clients_per_server"`
	Mix                          Mix           `json:"mix"`
	StepTime                     time.Duration `json:"step_time_ns"`
	LoadTime                     time.Duration `json:"model_load_time_ns"`
	FailoverServers              int           `json:"failover_servers"`
	FailoverTargets              []string      `json:"failover_targets"`
	PromptTimeout                time.Duration `json:"prompt_timeout_ns"`
	StatsInterval                time.Duration `json:"stats_interval_ns"`
}

// Results is the results file.
type Results struct {
	Meta     map[string]string `json:"meta"`
	Config   Config            `json:"config"`
	Runs     []*Run            `json:"runs"`
	Skipped  []string          `json:"skipped,omitempty"`
	Problems []string          `json:"problems,omitempty"` // functional errors
	Seconds  float64           `json:"seconds"`
}

// front is a started target: the address clients use.
type front struct {
	base string
	proc *proc // nil for direct
}

// available reports whether target can run (its binary exists), and why not.
func (b *bench) available(target string) (bool, string) {
	bin := map[string]string{"comfygate": b.cfg.Gateway, "nginx-rr": b.cfg.Nginx, "nginx-lc": b.cfg.Nginx, "haproxy-lc": b.cfg.HAProxy, "direct": b.cfg.Sim}[target]
	if bin == "" {
		return false, target + ": not installed (bash bench/run.sh --install)"
	}
	if _, err := exec.LookPath(bin); err != nil {
		return false, target + ": " + bin + " not found"
	}
	return true, ""
}

// runAll runs every scenario: for each number of servers, every target in
// turn (starting one later each time, so slow drifts of a shared machine do
// not always hit the same target), then the failover runs.
func (b *bench) runAll(ctx context.Context, res *Results) error {
	var targets []string
	for _, t := range b.cfg.Targets {
		if ok, why := b.available(t); ok {
			targets = append(targets, t)
		} else {
			res.Skipped = append(res.Skipped, why)
			b.log.Printf("skipped %s", why)
		}
	}
	for k, n := range b.cfg.Servers {
		var order []string
		for i := range targets {
			t := targets[(i+k)%len(targets)]
			if t == "direct" && n != 1 {
				continue // one server: the baseline
			}
			if n == 1 && t != "direct" && t != "comfygate" {
				continue // a balancer over one server is a proxy hop
			}
			order = append(order, t)
		}
		for _, t := range order {
			if err := b.record(ctx, res, t, n, false); err != nil {
				return err
			}
		}
	}
	for _, t := range b.cfg.FailoverTargets {
		if !slices.Contains(targets, t) || t == "direct" {
			continue
		}
		if err := b.record(ctx, res, t, b.cfg.FailoverServers, true); err != nil {
			return err
		}
	}
	return nil
}

func (b *bench) record(ctx context.Context, res *Results, target string, n int, failover bool) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	what := fmt.Sprintf("%s, %d server(s)", target, n)
	if failover {
		what += ", failover"
	}
	b.log.Printf("run: %s", what)
	r, err := b.runOne(ctx, target, n, failover)
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		res.Problems = append(res.Problems, what+": "+err.Error())
		b.log.Printf("  FAILED: %v", err)
		return nil
	}
	res.Runs = append(res.Runs, r)
	b.log.Printf("  %d/%d ok, %.1f prompts/min, makespan %.1fs, p50 %.1fs p95 %.1fs, model loads %d, lost %d, run twice %d, busy while waiting %.0f%% (min %.0f%%)",
		r.OK, r.Prompts, r.PerMinute, r.MakespanS, r.P50S, r.P95S, r.ModelLoads, r.Lost, r.RunTwice, 100*r.BusyWhileWaitingMean, 100*r.BusyWhileWaitingMin)
	if f := r.Kill; f != nil {
		b.log.Printf("  killed %s at %.1fs with %d prompt(s) on it: %d queued again within %.1fs, running again within %.1fs",
			f.Victim, f.KillAtS, f.Orphans, f.Requeued, f.RequeuedWithinS, f.RestartedWithinS)
	}
	for _, p := range r.problems() {
		res.Problems = append(res.Problems, what+": "+p)
		b.log.Printf("  PROBLEM: %s", p)
	}
	return nil
}

// runOne starts n fresh simulated servers and the target in front of them,
// sends the workload, and stops everything.
func (b *bench) runOne(ctx context.Context, target string, n int, failover bool) (*Run, error) {
	b.seq++
	name := fmt.Sprintf("%02d-%s-n%d", b.seq, target, n)
	if failover {
		name += "-failover"
	}
	dir := filepath.Join(b.cfg.Dir, name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	ps := b.ps.sub(dir)
	defer ps.stopAll()

	ports, err := freePorts(n + 1)
	if err != nil {
		return nil, err
	}
	sims := make([]*proc, n)
	bases := make([]string, n)
	models := "checkpoints=" + strings.Join(b.cfg.Mix.Checkpoints, ",")
	for i := range n {
		bases[i] = "http://" + addr(ports[i])
		sims[i], err = ps.start(fmt.Sprintf("sim%d", i+1), b.cfg.Sim, "--listen", "127.0.0.1", "--port", strconv.Itoa(ports[i]),
			"--stats", "--step-time", b.cfg.StepTime.String(), "--model-load-time", b.cfg.LoadTime.String(), "--models", models)
		if err != nil {
			return nil, err
		}
	}
	for i := range n {
		if err := waitHTTP(ctx, sims[i], bases[i]+"/sim/stats", 10*time.Second); err != nil {
			return nil, err
		}
	}
	fr, err := b.startFront(ctx, ps, dir, target, ports[n], ports[:n])
	if err != nil {
		return nil, err
	}
	// Let health checks and sockets settle the same way for every target.
	time.Sleep(500 * time.Millisecond)

	w := newWatcher(bases)
	w.refreshAll(ctx)
	wctx, wcancel := context.WithCancel(ctx)
	var wwg sync.WaitGroup
	wwg.Go(func() { w.run(wctx, b.cfg.StatsInterval) })
	defer func() { wcancel(); wwg.Wait() }()

	jobs := b.cfg.Mix.Jobs(b.cfg.PerServer * n)
	clients := b.cfg.ClientsPerServer * n
	outcomes := make([]Outcome, len(jobs))
	var next, completed atomic.Int64
	halfway := make(chan struct{})
	var halfOnce sync.Once
	cl := newClient(fr.base, b.cfg.PromptTimeout)
	defer cl.close()

	var kill *killInfo
	var kwg sync.WaitGroup
	if failover {
		kwg.Go(func() {
			select {
			case <-halfway:
			case <-ctx.Done():
				return
			}
			// Not at the very moment a client is done and sends its next
			// prompt: a server's death is not in step with its clients.
			time.Sleep(killDelay)
			kill = b.killOne(ctx, ps, w, sims, int(completed.Load()))
		})
	}
	var cwg sync.WaitGroup
	for range clients {
		cwg.Go(func() {
			for ctx.Err() == nil {
				i := int(next.Add(1) - 1)
				if i >= len(jobs) {
					return
				}
				outcomes[i] = cl.run(ctx, jobs[i])
				if outcomes[i].Status == "ok" && int(completed.Add(1)) >= len(jobs)/2 {
					halfOnce.Do(func() { close(halfway) })
				}
			}
		})
	}
	cwg.Wait()
	halfOnce.Do(func() { close(halfway) })
	kwg.Wait()
	if ctx.Err() != nil {
		return nil, ctx.Err()
	}
	// A copy left on a server may still run after the clients are done
	// (a prompt run twice): after a failover, give the gateway time for
	// one more poll, then wait until every server is idle, and read the
	// final state.
	if failover {
		time.Sleep(2500 * time.Millisecond)
	}
	b.drain(ctx, w)
	wcancel()
	wwg.Wait()
	w.refreshAll(ctx)
	last, seen := w.snapshot()

	var gw map[string]float64
	if target == "comfygate" {
		gw = gatewayCounters(ctx, fr.base)
	}
	r := figures(target, n, failover, outcomes, last, seen, kill)
	r.Gateway = gw
	r.Clients = clients
	for i := range n {
		r.ServerURLs = append(r.ServerURLs, bases[i])
	}
	return r, nil
}

// killDelay is how long after half the prompts are done the server dies.
const killDelay = 250 * time.Millisecond

// drain waits (up to a minute) until no live server runs or holds a
// prompt.
func (b *bench) drain(ctx context.Context, w *watcher) {
	deadline := time.Now().Add(time.Minute)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		w.refreshAll(ctx)
		last, _ := w.snapshot()
		w.mu.Lock()
		idle := true
		for i, s := range last {
			if w.alive[i] && (s.Running != "" || len(s.Pending) > 0) {
				idle = false
			}
		}
		w.mu.Unlock()
		if idle {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	b.log.Printf("  servers still busy a minute after the clients were done")
}

// killInfo is what the failover run did.
type killInfo struct {
	victim    int
	at        time.Time
	completed int // prompts done when it was killed
	orphans   []string
}

// killOne kills the server with the most prompts on it (the last one on a
// tie) with SIGKILL, right after reading its final stats.
func (b *bench) killOne(ctx context.Context, ps *procs, w *watcher, sims []*proc, completed int) *killInfo {
	w.refreshAll(ctx)
	last, _ := w.snapshot()
	victim, most := len(sims)-1, -1
	for i := len(sims) - 1; i >= 0; i-- {
		load := len(last[i].Pending)
		if last[i].Running != "" {
			load++
		}
		if load > most {
			victim, most = i, load
		}
	}
	if err := w.refresh(ctx, victim); err != nil {
		b.log.Printf("  cannot read the stats of sim%d before killing it: %v", victim+1, err)
	}
	w.dead(victim)
	at := time.Now()
	ps.kill(sims[victim])
	last, _ = w.snapshot()
	k := &killInfo{victim: victim, at: at, completed: completed}
	if last[victim].Running != "" {
		k.orphans = append(k.orphans, last[victim].Running)
	}
	k.orphans = append(k.orphans, last[victim].Pending...)
	b.log.Printf("  killed sim%d (SIGKILL) after %d prompts done; %d prompt(s) were on it", victim+1, completed, len(k.orphans))
	return k
}

// startFront starts target in front of the servers and waits until it
// answers as a ComfyUI does.
func (b *bench) startFront(ctx context.Context, ps *procs, dir, target string, port int, servers []int) (*front, error) {
	base := "http://" + addr(port)
	switch target {
	case "direct":
		return &front{base: "http://" + addr(servers[0])}, nil
	case "comfygate":
		args := []string{b.cfg.Gateway, "--listen", "127.0.0.1", "--port", strconv.Itoa(port)}
		for i, p := range servers {
			if len(servers) == 1 {
				args = append(args, "--upstream", "http://"+addr(p))
			} else {
				args = append(args, "--upstream", fmt.Sprintf("sim%d=http://%s", i+1, addr(p)))
			}
		}
		p, err := ps.start("comfygate", args...)
		if err != nil {
			return nil, err
		}
		if err := waitFleet(ctx, p, base, len(servers)); err != nil {
			return nil, err
		}
		return &front{base: base, proc: p}, nil
	case "nginx-rr", "nginx-lc":
		os.MkdirAll(filepath.Join(dir, "tmp"), 0o755)
		conf := filepath.Join(dir, "nginx.conf")
		if err := os.WriteFile(conf, []byte(nginxConf(dir, port, servers, target == "nginx-lc")), 0o644); err != nil {
			return nil, err
		}
		nargs := []string{"-e", filepath.Join(dir, "error.log"), "-p", dir + "/", "-c", conf}
		if out, err := exec.Command(b.cfg.Nginx, append([]string{"-q", "-t"}, nargs...)...).CombinedOutput(); err != nil {
			return nil, fmt.Errorf("nginx rejects its configuration: %v: %s", err, out)
		}
		p, err := ps.start("nginx", append([]string{b.cfg.Nginx}, nargs...)...)
		if err != nil {
			return nil, err
		}
		if err := waitHTTP(ctx, p, base+"/queue", 10*time.Second); err != nil {
			return nil, err
		}
		return &front{base: base, proc: p}, nil
	case "haproxy-lc":
		conf := filepath.Join(dir, "haproxy.cfg")
		if err := os.WriteFile(conf, []byte(haproxyConf(port, servers, "leastconn")), 0o644); err != nil {
			return nil, err
		}
		if out, err := exec.Command(b.cfg.HAProxy, "-q", "-c", "-f", conf).CombinedOutput(); err != nil {
			return nil, fmt.Errorf("haproxy rejects its configuration: %v: %s", err, out)
		}
		p, err := ps.start("haproxy", b.cfg.HAProxy, "-db", "-f", conf)
		if err != nil {
			return nil, err
		}
		if err := waitHTTP(ctx, p, base+"/queue", 10*time.Second); err != nil {
			return nil, err
		}
		return &front{base: base, proc: p}, nil
	}
	return nil, fmt.Errorf("unknown target %q", target)
}

// waitFleet waits until comfygate's /health lists every server healthy.
func waitFleet(ctx context.Context, p *proc, base string, n int) error {
	if err := waitHTTP(ctx, p, base+"/health/ready", 15*time.Second); err != nil {
		return err
	}
	if n == 1 {
		return nil
	}
	cl := &http.Client{Transport: &http.Transport{Proxy: nil}, Timeout: time.Second}
	defer cl.CloseIdleConnections()
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		if res, err := cl.Get(base + "/health"); err == nil {
			var h struct {
				Upstreams []struct {
					Status string `json:"status"`
				} `json:"upstreams"`
			}
			json.NewDecoder(res.Body).Decode(&h)
			res.Body.Close()
			healthy := 0
			for _, u := range h.Upstreams {
				if u.Status == "healthy" {
					healthy++
				}
			}
			if healthy == n {
				return nil
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("comfygate: not every server healthy in /health after 15s")
}

// gatewayCounters reads comfygate's fleet counters from /metrics (served
// without a key when no key is configured), summed over servers.
func gatewayCounters(ctx context.Context, base string) map[string]float64 {
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, base+"/metrics", nil)
	cl := &http.Client{Transport: &http.Transport{Proxy: nil}, Timeout: 5 * time.Second}
	defer cl.CloseIdleConnections()
	res, err := cl.Do(req)
	if err != nil {
		return nil
	}
	defer res.Body.Close()
	return parseCounters(res.Body, []string{
		"comfygate_fleet_prompts_dispatched_total", "comfygate_fleet_prompts_resubmitted_total", "comfygate_fleet_prompts_stolen_total",
	})
}

// parseCounters sums the samples of each named metric in Prometheus text.
func parseCounters(r io.Reader, names []string) map[string]float64 {
	out := map[string]float64{}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		for _, name := range names {
			rest, ok := strings.CutPrefix(line, name)
			if !ok || (rest != "" && rest[0] != '{' && rest[0] != ' ') {
				continue
			}
			f := strings.Fields(rest[strings.LastIndexByte(rest, '}')+1:])
			if len(f) == 0 {
				continue
			}
			if v, err := strconv.ParseFloat(f[0], 64); err == nil {
				out[strings.TrimPrefix(strings.TrimSuffix(name, "_total"), "comfygate_fleet_prompts_")] += v
			}
		}
	}
	return out
}
