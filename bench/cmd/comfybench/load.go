package main

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"
)

// Target is one thing measured: the upstream itself (kind "direct") or a
// proxy in front of it.
type Target struct {
	Name string `json:"name"`
	Kind string `json:"kind"` // direct, comfygate, nginx, haproxy, caddy
	Auth bool   `json:"auth"` // key-checking configuration
	URL  string `json:"url"`
	PID  int    `json:"pid,omitempty"` // root of the proxy's process tree
	// Checks records the functional checks done before measuring.
	Checks map[string]string `json:"checks,omitempty"`

	addr  string
	procs []int
}

// Measurement is one scenario on one target in one repetition.
type Measurement struct {
	Rep      int                `json:"rep"`
	Scenario string             `json:"scenario"`
	Target   string             `json:"target"`
	Metrics  map[string]float64 `json:"metrics"`
}

// Settings are the sizes and durations the run used.
type Settings struct {
	Quick        bool    `json:"quick"`
	Reps         int     `json:"reps"`
	Concurrency  []int   `json:"concurrency"`
	SmallSeconds float64 `json:"small_seconds"`
	PostSeconds  float64 `json:"post_seconds"`
	ViewSeconds  float64 `json:"view_seconds"`
	WarmSeconds  float64 `json:"warm_seconds"`
	PostBytes    int     `json:"post_bytes"`
	ViewBytes    int     `json:"view_bytes"`
	WSConnects   int     `json:"ws_connects"`
	WSBursts     int     `json:"ws_bursts"`
	IdleSockets  int     `json:"idle_sockets"`
	// SettleSeconds is how long the idle sockets stay open before the
	// memory is read.
	SettleSeconds float64 `json:"settle_seconds"`
}

// Results is what load writes and report reads.
type Results struct {
	Meta         map[string]string `json:"meta"`
	Settings     Settings          `json:"settings"`
	Targets      []*Target         `json:"targets"`
	Measurements []Measurement     `json:"measurements"`
	Notes        []string          `json:"notes,omitempty"`
	Seconds      float64           `json:"seconds"`
}

type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, " ") }
func (m *multiFlag) Set(v string) error { *m = append(*m, v); return nil }

type loader struct {
	key          string
	upstreamPID  int
	upstreamTree []int
	set          Settings
	res          *Results
	maxReq       int
}

func runLoad(args []string) error {
	fs := flag.NewFlagSet("load", flag.ContinueOnError)
	var targets, meta multiFlag
	fs.Var(&targets, "target", "name=N,kind=K,url=http://127.0.0.1:P[,pid=PID][,auth=1] (repeatable)")
	fs.Var(&meta, "meta", "key=value recorded in the results (repeatable)")
	key := fs.String("key", "", "API key the key-checking targets require")
	upPID := fs.Int("upstream-pid", 0, "PID of the fake upstream")
	out := fs.String("out", "bench/results/latest.json", "results file")
	quick := fs.Bool("quick", false, "CI smoke: short durations, 200 idle sockets, 1 repetition")
	reps := fs.Int("reps", 0, "repetitions (default 2, 1 with --quick)")
	idle := fs.Int("idle", 0, "idle WebSockets per target (default 2000, 200 with --quick)")
	strict := fs.Bool("strict", false, "exit 1 if a target fails its checks or any request fails")
	maxTime := fs.Duration("max-time", 20*time.Minute, "hard limit: exit after this long")
	only := fs.String("scenarios", "", "comma-separated scenario names to run (default all), e.g. get-c16,view8m,ws-idle")
	if err := fs.Parse(args); err != nil {
		return err
	}
	time.AfterFunc(*maxTime, func() {
		fmt.Fprintf(os.Stderr, "comfybench load: --max-time %s exceeded, exiting\n", *maxTime)
		os.Exit(3)
	})
	set := Settings{
		Quick: *quick, Reps: 2, Concurrency: []int{1, 16, 128},
		SmallSeconds: 3, PostSeconds: 2, ViewSeconds: 2, WarmSeconds: 0.3,
		PostBytes: 50 << 10, ViewBytes: ViewSize, WSConnects: 20, WSBursts: 10, IdleSockets: 2000,
		SettleSeconds: 1,
	}
	if *quick {
		set.Reps, set.SmallSeconds, set.PostSeconds, set.ViewSeconds, set.WarmSeconds = 1, 0.3, 0.3, 0.3, 0.1
		set.WSConnects, set.WSBursts, set.IdleSockets, set.SettleSeconds = 5, 3, 200, 0.3
	}
	if *reps > 0 {
		set.Reps = min(*reps, 10)
	}
	if *idle > 0 {
		set.IdleSockets = min(*idle, 10000)
	}
	res := &Results{Meta: machineInfo(), Settings: set}
	for _, m := range meta {
		k, v, _ := strings.Cut(m, "=")
		res.Meta[k] = v
	}
	for _, spec := range targets {
		t, err := parseTarget(spec)
		if err != nil {
			return err
		}
		res.Targets = append(res.Targets, t)
	}
	if len(res.Targets) == 0 {
		return errors.New("no --target given")
	}
	l := &loader{key: *key, upstreamPID: *upPID, set: set, res: res, maxReq: 5_000_000}
	l.upstreamTree = procTree(*upPID)
	start := time.Now()

	// Functional checks first: a target that does not proxy correctly is
	// reported and left out rather than measured.
	var ok []*Target
	for _, t := range res.Targets {
		if err := l.check(t); err != nil {
			note := fmt.Sprintf("%s: left out, functional check failed: %v", t.Name, err)
			fmt.Fprintln(os.Stderr, note)
			res.Notes = append(res.Notes, note)
			continue
		}
		ok = append(ok, t)
	}

	type scenario struct {
		name string
		run  func(*Target) map[string]float64
	}
	post := make([]byte, set.PostBytes)
	fillPrompt(post)
	var scenarios []scenario
	for _, c := range set.Concurrency {
		scenarios = append(scenarios, scenario{fmt.Sprintf("get-c%d", c), func(t *Target) map[string]float64 {
			return l.httpLoad(t, c, set.SmallSeconds, "GET", "/api/prompt", nil)
		}})
	}
	for _, c := range []int{1, 16} {
		scenarios = append(scenarios, scenario{fmt.Sprintf("post50k-c%d", c), func(t *Target) map[string]float64 {
			return l.httpLoad(t, c, set.PostSeconds, "POST", "/api/prompt", post)
		}})
	}
	scenarios = append(scenarios,
		scenario{"view8m", func(t *Target) map[string]float64 {
			return l.httpLoad(t, 1, set.ViewSeconds, "GET", "/api/view?filename=big&type=output", nil)
		}},
		scenario{"ws-burst", l.wsBurst},
		scenario{"ws-idle", l.wsIdle},
	)
	if *only != "" {
		want := strings.Split(*only, ",")
		scenarios = slices.DeleteFunc(scenarios, func(sc scenario) bool { return !slices.Contains(want, sc.name) })
		if len(scenarios) == 0 {
			return fmt.Errorf("--scenarios %q matches no scenario", *only)
		}
	}
	for rep := 1; rep <= set.Reps; rep++ {
		for _, sc := range scenarios {
			for i := range ok {
				// Round-robin, starting one target later every repetition.
				t := ok[(i+rep-1)%len(ok)]
				t.procs = procTree(t.PID)
				l.upstreamTree = procTree(l.upstreamPID)
				m := sc.run(t)
				res.Measurements = append(res.Measurements, Measurement{Rep: rep, Scenario: sc.name, Target: t.Name, Metrics: m})
				fmt.Fprintf(os.Stderr, "rep %d %-12s %-14s %s\n", rep, sc.name, t.Name, brief(m))
			}
		}
	}
	res.Seconds = time.Since(start).Seconds()
	b, err := json.MarshalIndent(res, "", " ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(*out, append(b, '\n'), 0o644); err != nil {
		return err
	}
	if *strict {
		failed := len(res.Notes)
		for _, m := range res.Measurements {
			if m.Metrics["errors"] > 0 {
				fmt.Fprintf(os.Stderr, "%s on %s: %.0f errors\n", m.Scenario, m.Target, m.Metrics["errors"])
				failed++
			}
		}
		if failed > 0 {
			return fmt.Errorf("--strict: %d failure(s)", failed)
		}
	}
	return nil
}

func brief(m map[string]float64) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	var b strings.Builder
	for _, k := range keys {
		fmt.Fprintf(&b, "%s=%.4g ", k, m[k])
	}
	return b.String()
}

func parseTarget(spec string) (*Target, error) {
	t := &Target{}
	for _, kv := range strings.Split(spec, ",") {
		k, v, _ := strings.Cut(kv, "=")
		switch k {
		case "name":
			t.Name = v
		case "kind":
			t.Kind = v
		case "url":
			t.URL = v
		case "pid":
			t.PID, _ = strconv.Atoi(v)
		case "auth":
			t.Auth = v == "1" || v == "true"
		default:
			return nil, fmt.Errorf("target %q: unknown field %q", spec, k)
		}
	}
	u, err := url.Parse(t.URL)
	if err != nil || u.Scheme != "http" || t.Name == "" {
		return nil, fmt.Errorf("target %q: need name= and url=http://127.0.0.1:PORT", spec)
	}
	if err := checkLoopback(u.Host); err != nil {
		return nil, err
	}
	t.addr = u.Host
	return t, nil
}

func machineInfo() map[string]string {
	m := map[string]string{
		"nproc":      strconv.Itoa(runtime.NumCPU()),
		"go_harness": runtime.Version(),
		"date":       time.Now().UTC().Format("2006-01-02 15:04 UTC"),
	}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
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
		m["memory"] = strings.Join(strings.Fields(line)[1:], " ")
	}
	if b, err := os.ReadFile("/etc/debian_version"); err == nil {
		m["debian"] = strings.TrimSpace(string(b))
	}
	return m
}

// fillPrompt fills b with a JSON workflow-like document of exactly len(b) bytes.
func fillPrompt(b []byte) {
	head := []byte(`{"client_id":"comfybench","prompt":{"3":{"class_type":"KSampler","inputs":{"seed":1,"text":"`)
	tail := []byte(`"}}}}`)
	for i := range b {
		b[i] = 'a' + byte(i%26)
	}
	copy(b, head)
	copy(b[len(b)-len(tail):], tail)
}

func (l *loader) headers(t *Target, scheme string) []string {
	if !t.Auth {
		return nil
	}
	if scheme == "bearer" {
		return []string{"Authorization: Bearer " + l.key}
	}
	return []string{"X-API-Key: " + l.key}
}

// check verifies that the target proxies, requires the key when it should,
// and does not pass the key to the upstream.
func (l *loader) check(t *Target) error {
	t.Checks = map[string]string{}
	deadline := time.Now().Add(10 * time.Second)
	rc := newRawConn(t.addr)
	defer rc.close()
	get := func(h []string) (rawResp, error) {
		return rc.do(buildRequest("GET", t.addr, "/api/prompt", h, nil), deadline)
	}
	r, err := get(l.headers(t, "x-api-key"))
	if err != nil || r.status != 200 {
		return fmt.Errorf("GET /api/prompt: status %d, %v", r.status, err)
	}
	t.Checks["get"] = "200"
	if r.sawKey {
		t.Checks["key_reaches_upstream"] = "yes"
	}
	if t.Auth {
		r, err = get(l.headers(t, "bearer"))
		if err != nil || r.status != 200 {
			return fmt.Errorf("GET with Bearer key: status %d, %v", r.status, err)
		}
		if r.sawKey {
			t.Checks["key_reaches_upstream"] = "yes"
		}
		r, err = get(nil)
		if err != nil || r.status != 401 {
			return fmt.Errorf("GET without key: status %d (want 401), %v", r.status, err)
		}
		r, err = get([]string{"X-API-Key: wrong-" + l.key})
		if err != nil || r.status != 401 {
			return fmt.Errorf("GET with a wrong key: status %d (want 401), %v", r.status, err)
		}
		t.Checks["no_key"] = "401"
		if t.Checks["key_reaches_upstream"] == "" {
			t.Checks["key_reaches_upstream"] = "no"
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, _, err := l.dialWS(ctx, t, true)
	if err != nil {
		return fmt.Errorf("WebSocket: %v", err)
	}
	c.CloseNow()
	t.Checks["ws"] = "101"
	if t.Auth {
		c, resp, err := l.dialWS(ctx, t, false)
		if err == nil {
			c.CloseNow()
			t.Checks["ws_no_key"] = "101 (open)"
		} else if resp != nil {
			t.Checks["ws_no_key"] = strconv.Itoa(resp.StatusCode)
		}
	}
	return nil
}

var wsClient = &http.Client{Transport: &http.Transport{DisableKeepAlives: true, Proxy: nil}}

func (l *loader) dialWS(ctx context.Context, t *Target, withKey bool) (*websocket.Conn, *http.Response, error) {
	h := http.Header{}
	if t.Auth && withKey {
		h.Set("X-API-Key", l.key)
	}
	c, resp, err := websocket.Dial(ctx, "ws://"+t.addr+"/ws?clientId=comfybench", &websocket.DialOptions{
		HTTPHeader: h, HTTPClient: wsClient, CompressionMode: websocket.CompressionDisabled,
	})
	if err != nil {
		return nil, resp, err
	}
	c.SetReadLimit(1 << 20)
	return c, resp, nil
}

func percentile(sorted []int64, p float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := int(p * float64(len(sorted)-1))
	return float64(sorted[i])
}

// httpLoad runs conc workers for warm+dur seconds and measures the last dur.
func (l *loader) httpLoad(t *Target, conc int, dur float64, method, path string, body []byte) map[string]float64 {
	req := buildRequest(method, t.addr, path, l.headers(t, "x-api-key"), body)
	warm := time.Duration(l.set.WarmSeconds * float64(time.Second))
	begin := time.Now()
	start := begin.Add(warm)
	end := start.Add(time.Duration(dur * float64(time.Second)))
	var (
		mu        sync.Mutex
		lats      []int64
		errs      atomic.Int64
		bytesDone atomic.Int64
		busyNs    atomic.Int64
		total     atomic.Int64
		wg        sync.WaitGroup
	)
	for range conc {
		wg.Go(func() {
			rc := newRawConn(t.addr)
			defer rc.close()
			var my []int64
			for time.Now().Before(end) && total.Add(1) <= int64(l.maxReq) {
				t0 := time.Now()
				r, err := rc.do(req, end.Add(10*time.Second))
				t1 := time.Now()
				if err != nil || r.status != 200 || r.sawKey {
					errs.Add(1)
					if err != nil {
						time.Sleep(10 * time.Millisecond)
					}
					continue
				}
				if t0.Before(start) || t1.After(end) {
					continue
				}
				my = append(my, int64(t1.Sub(t0)))
				bytesDone.Add(r.bytes)
				busyNs.Add(int64(t1.Sub(t0)))
			}
			mu.Lock()
			lats = append(lats, my...)
			mu.Unlock()
		})
	}
	// Memory sampler (peak RSS of the proxy during the window).
	var peakRSS, rss0 int64
	sampleDone := make(chan struct{})
	stopSample := make(chan struct{})
	time.Sleep(time.Until(start))
	rss0 = memKB(t.procs, "VmRSS")
	cpu0, up0 := cpuSeconds(t.procs), cpuSeconds(l.upstreamTree)
	foreign := startForeign(t.procs, l.upstreamTree)
	go func() {
		defer close(sampleDone)
		tick := time.NewTicker(5 * time.Millisecond)
		defer tick.Stop()
		for {
			if v := memKB(t.procs, "VmRSS"); v > peakRSS {
				peakRSS = v
			}
			select {
			case <-stopSample:
				return
			case <-tick.C:
			}
		}
	}()
	time.Sleep(time.Until(end))
	cpu1, up1 := cpuSeconds(t.procs), cpuSeconds(l.upstreamTree)
	other := foreign.cores(dur)
	close(stopSample)
	<-sampleDone
	wg.Wait()
	slices.Sort(lats)
	n := float64(len(lats))
	m := map[string]float64{
		"requests": n,
		"errors":   float64(errs.Load()),
		"rps":      n / dur,
		"p50_us":   percentile(lats, 0.50) / 1e3,
		"p99_us":   percentile(lats, 0.99) / 1e3,
		// CPU used meanwhile by processes not under test, in cores.
		"foreign_cores": other,
	}
	if n > 0 {
		m["upstream_cpu_us"] = (up1 - up0) * 1e6 / n
		if t.procs != nil {
			m["proxy_cpu_us"] = (cpu1 - cpu0) * 1e6 / n
			m["proxy_cpu_util"] = (cpu1 - cpu0) / dur
		}
		if busy := busyNs.Load(); busy > 0 {
			m["mib_s"] = float64(bytesDone.Load()) / (1 << 20) / (float64(busy) / 1e9) * float64(conc)
		}
	}
	if t.procs != nil {
		m["rss_before_mib"] = float64(rss0) / 1024
		m["peak_rss_mib"] = float64(peakRSS) / 1024
	}
	return m
}

// wsBurst measures WebSocket connects, then bursts of 1000 text messages
// with 100 binary 64 KiB frames, latency measured from the upstream's send
// stamp to the client's receipt.
func (l *loader) wsBurst(t *Target) map[string]float64 {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	m := map[string]float64{}
	var connects []int64
	errs := 0
	for range l.set.WSConnects {
		t0 := time.Now()
		c, _, err := l.dialWS(ctx, t, true)
		if err != nil {
			errs++
			continue
		}
		connects = append(connects, int64(time.Since(t0)))
		c.Close(websocket.StatusNormalClosure, "")
	}
	var lats []int64
	var burstNs int64
	bursts := 0
	cpu0, up0 := cpuSeconds(t.procs), cpuSeconds(l.upstreamTree)
	c, _, err := l.dialWS(ctx, t, true)
	if err != nil {
		errs++
	} else {
		for range l.set.WSBursts {
			t0 := time.Now()
			if err := c.Write(ctx, websocket.MessageText, []byte("burst")); err != nil {
				errs++
				break
			}
			got := 0
			for range 10 * (burstText + burstBinary) {
				typ, msg, err := c.Read(ctx)
				now := time.Now().UnixNano()
				if err != nil {
					errs++
					break
				}
				var sent int64
				if typ == websocket.MessageBinary {
					if len(msg) != burstBinarySize {
						errs++
					}
					sent = int64(binary.BigEndian.Uint64(msg[8:16]))
				} else {
					if strings.Contains(string(msg[:min(len(msg), 40)]), `"type":"done"`) {
						break
					}
					rest, _ := strings.CutPrefix(string(msg[:min(len(msg), 30)]), `{"t":`)
					num, _, _ := strings.Cut(rest, ",")
					sent, _ = strconv.ParseInt(num, 10, 64)
				}
				got++
				lats = append(lats, now-sent)
			}
			if got != burstText+burstBinary {
				errs++
			}
			burstNs += int64(time.Since(t0))
			bursts++
		}
		c.Close(websocket.StatusNormalClosure, "")
	}
	cpu1, up1 := cpuSeconds(t.procs), cpuSeconds(l.upstreamTree)
	slices.Sort(connects)
	slices.Sort(lats)
	m["errors"] = float64(errs)
	m["connect_p50_us"] = percentile(connects, 0.5) / 1e3
	m["connect_p99_us"] = percentile(connects, 0.99) / 1e3
	m["msg_p50_us"] = percentile(lats, 0.5) / 1e3
	m["msg_p99_us"] = percentile(lats, 0.99) / 1e3
	m["messages"] = float64(len(lats))
	if bursts > 0 {
		m["burst_ms"] = float64(burstNs) / 1e6 / float64(bursts)
		m["upstream_cpu_ms"] = (up1 - up0) * 1e3 / float64(bursts)
		if t.procs != nil {
			m["proxy_cpu_ms"] = (cpu1 - cpu0) * 1e3 / float64(bursts)
		}
	}
	return m
}

// wsIdle opens n WebSockets, lets them settle, and measures the proxy's
// resident memory before and after.
func (l *loader) wsIdle(t *Target) map[string]float64 {
	n := l.set.IdleSockets
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	procs := t.procs
	m := map[string]float64{}
	rss0, up0 := memKB(procs, "VmRSS"), memKB(l.upstreamTree, "VmRSS")
	conns := make([]*websocket.Conn, n)
	var errs atomic.Int64
	var next atomic.Int64
	var wg sync.WaitGroup
	t0 := time.Now()
	for range 16 {
		wg.Go(func() {
			for {
				i := next.Add(1) - 1
				if i >= int64(n) {
					return
				}
				c, _, err := l.dialWS(ctx, t, true)
				if err != nil {
					errs.Add(1)
					continue
				}
				conns[i] = c
			}
		})
	}
	wg.Wait()
	m["open_s"] = time.Since(t0).Seconds()
	time.Sleep(time.Duration(l.set.SettleSeconds * float64(time.Second))) // let the proxy settle
	rss1, up1 := memKB(procs, "VmRSS"), memKB(l.upstreamTree, "VmRSS")
	open := float64(int64(n) - errs.Load())
	m["errors"] = float64(errs.Load())
	m["open"] = open
	if open > 0 {
		m["upstream_kib_per_ws"] = float64(up1-up0) / open
		if procs != nil {
			m["rss_before_mib"] = float64(rss0) / 1024
			m["rss_after_mib"] = float64(rss1) / 1024
			m["kib_per_ws"] = float64(rss1-rss0) / open
		}
	}
	for _, c := range conns {
		if c != nil {
			c.CloseNow()
		}
	}
	time.Sleep(time.Duration(l.set.SettleSeconds * float64(time.Second) / 2)) // let both ends notice
	return m
}
