package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"
)

// runBench is "fleetbench run".
func runBench(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("run", flag.ContinueOnError)
	cfg := Config{}
	fs.StringVar(&cfg.Sim, "sim", "", "comfyui-sim binary (required)")
	fs.StringVar(&cfg.Gateway, "comfygate", "", "comfygate binary (required)")
	fs.StringVar(&cfg.Nginx, "nginx", "", "nginx binary (empty: nginx targets skipped)")
	fs.StringVar(&cfg.HAProxy, "haproxy", "", "haproxy binary (empty: HAProxy target skipped)")
	fs.StringVar(&cfg.Dir, "dir", "", "directory for configurations, logs and the pid list (required)")
	out := fs.String("out", "bench/results/fleet.json", "results file")
	quick := fs.Bool("quick", false, "CI smoke: 1 and 2 servers, a short workload and a failover with 2 servers")
	servers := fs.String("servers", "1,2,4,8", "numbers of servers")
	targets := fs.String("targets", strings.Join(allTargets, ","), "targets")
	fs.IntVar(&cfg.PerServer, "prompts-per-server", 10, "prompts in the workload per server")
	fs.IntVar(&cfg.ClientsPerServer, "clients-per-server", 2, "concurrent clients per server (each sends one prompt at a time)")
	ckpts := fs.String("checkpoints", "sd15.safetensors:3,sdxl.safetensors:2,flux1-dev.safetensors:1", "checkpoints of the workload with their weights, NAME:WEIGHT,...")
	fs.IntVar(&cfg.Mix.ShortSteps, "short-steps", 20, "KSampler steps of a short prompt")
	fs.IntVar(&cfg.Mix.LongSteps, "long-steps", 60, "KSampler steps of a long prompt")
	fs.Float64Var(&cfg.Mix.LongShare, "long-share", 0.3, "share of long prompts")
	fs.Uint64Var(&cfg.Mix.Seed, "seed", 14, "seed of the workload")
	fs.DurationVar(&cfg.StepTime, "step-time", 50*time.Millisecond, "simulated time of one sampling step")
	fs.DurationVar(&cfg.LoadTime, "model-load-time", 2*time.Second, "simulated time of a checkpoint load")
	fs.IntVar(&cfg.FailoverServers, "failover-servers", 4, "servers in the failover runs (one is killed halfway)")
	failTargets := fs.String("failover-targets", "comfygate,nginx-rr,nginx-lc,haproxy-lc", "targets of the failover runs (empty: none)")
	fs.DurationVar(&cfg.PromptTimeout, "prompt-timeout", 2*time.Minute, "a prompt without its image after this is lost")
	fs.DurationVar(&cfg.StatsInterval, "stats-interval", 200*time.Millisecond, "how often every server's /sim/stats is read")
	maxTime := fs.Duration("max-time", 20*time.Minute, "stop everything after this, whatever happens")
	var metas metaFlag
	fs.Var(&metas, "meta", "KEY=VALUE shown on the page (repeatable)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if cfg.Sim == "" || cfg.Gateway == "" || cfg.Dir == "" {
		return errors.New("run: --sim, --comfygate and --dir are required")
	}
	var err error
	if cfg.Mix.Checkpoints, cfg.Mix.Weights, err = parseCheckpoints(*ckpts); err != nil {
		return err
	}
	cfg.Quick = *quick
	if cfg.Quick {
		*servers = "1,2"
		cfg.PerServer = 4
		cfg.StepTime = 20 * time.Millisecond
		cfg.LoadTime = 500 * time.Millisecond
		cfg.FailoverServers = 2
		*failTargets = "comfygate"
	}
	if cfg.Servers, err = parseInts(*servers); err != nil {
		return fmt.Errorf("--servers: %w", err)
	}
	cfg.Targets = splitList(*targets)
	cfg.FailoverTargets = splitList(*failTargets)
	for _, t := range append(append([]string{}, cfg.Targets...), cfg.FailoverTargets...) {
		if _, ok := targetInfo[t]; !ok {
			return fmt.Errorf("unknown target %q (known: %s)", t, strings.Join(allTargets, ", "))
		}
	}
	if cfg.PerServer < 2 || cfg.ClientsPerServer < 1 || cfg.FailoverServers < 2 || cfg.StepTime <= 0 ||
		cfg.Mix.ShortSteps < 1 || cfg.Mix.LongSteps < 1 || cfg.Mix.LongShare < 0 || cfg.Mix.LongShare > 1 {
		return errors.New("run: a size or time is out of range")
	}

	ctx, cancel := context.WithTimeout(ctx, *maxTime)
	defer cancel()
	ps, err := newProcs(cfg.Dir)
	if err != nil {
		return err
	}
	defer ps.stopAll()
	b := &bench{cfg: cfg, ps: ps, log: log.New(os.Stderr, "== ", 0)}

	res := &Results{Meta: machineInfo(), Config: cfg}
	for k, v := range metas {
		res.Meta[k] = v
	}
	res.Meta["comfygate"] = version(cfg.Gateway, "--version")
	if cfg.Nginx != "" {
		res.Meta["nginx"] = version(cfg.Nginx, "-v")
	}
	if cfg.HAProxy != "" {
		res.Meta["haproxy"] = version(cfg.HAProxy, "-v")
	}
	start := time.Now()
	if err := b.runAll(ctx, res); err != nil {
		// Interrupted (a signal, or --max-time): no results file, so an
		// unfinished run never replaces a published one.
		return fmt.Errorf("run interrupted after %.0f s: %w", time.Since(start).Seconds(), err)
	}
	res.Seconds = time.Since(start).Seconds()
	if err := writeJSON(*out, res); err != nil {
		return err
	}
	b.log.Printf("wrote %s (%.0f s)", *out, res.Seconds)
	if len(res.Problems) > 0 {
		return fmt.Errorf("%d functional problem(s):\n  %s", len(res.Problems), strings.Join(res.Problems, "\n  "))
	}
	return nil
}

func writeJSON(path string, v any) error {
	b, err := json.MarshalIndent(v, "", " ")
	if err != nil {
		return err
	}
	if dir := filepath.Dir(path); dir != "" {
		os.MkdirAll(dir, 0o755)
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}

type metaFlag map[string]string

func (m *metaFlag) String() string { return "" }

func (m *metaFlag) Set(s string) error {
	k, v, ok := strings.Cut(s, "=")
	if !ok || k == "" {
		return fmt.Errorf("want KEY=VALUE, got %q", s)
	}
	if *m == nil {
		*m = map[string]string{}
	}
	(*m)[k] = v
	return nil
}

func splitList(s string) []string {
	var out []string
	for part := range strings.SplitSeq(s, ",") {
		if part = strings.TrimSpace(part); part != "" {
			out = append(out, part)
		}
	}
	return out
}

func parseInts(s string) ([]int, error) {
	var out []int
	for _, part := range splitList(s) {
		n, err := strconv.Atoi(part)
		if err != nil || n < 1 || n > 32 {
			return nil, fmt.Errorf("%q: want numbers from 1 to 32", part)
		}
		out = append(out, n)
	}
	if len(out) == 0 {
		return nil, errors.New("empty")
	}
	return out, nil
}

// version returns the first line a binary prints about its version.
func version(bin, flag string) string {
	out, _ := exec.Command(bin, flag).CombinedOutput()
	line, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
	return line
}

func machineInfo() map[string]string {
	m := map[string]string{
		"nproc": strconv.Itoa(runtime.NumCPU()),
		"go":    runtime.Version(),
		"date":  time.Now().UTC().Format("2006-01-02 15:04 UTC"),
	}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for line := range strings.SplitSeq(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				m["cpu"] = strings.TrimSpace(v)
				break
			}
		}
	}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m["kernel"] = strings.TrimSpace(string(b))
	}
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		line, _, _ := strings.Cut(string(b), "\n")
		if f := strings.Fields(line); len(f) > 1 {
			m["memory"] = strings.Join(f[1:], " ")
		}
	}
	if b, err := os.ReadFile("/etc/debian_version"); err == nil {
		m["debian"] = strings.TrimSpace(string(b))
	}
	return m
}
