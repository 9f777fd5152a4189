package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// Every target must get the same prompts in the same order, or the
// comparison means nothing.
func TestJobsAreTheSameForEveryTarget(t *testing.T) {
	m := Mix{Checkpoints: []string{"a.safetensors", "b.safetensors"}, Weights: []int{3, 1}, ShortSteps: 20, LongSteps: 60, LongShare: 0.3, Seed: 14}
	a, b := m.Jobs(200), m.Jobs(200)
	if diff := cmp.Diff(a, b); diff != "" {
		t.Fatalf("two calls differ (-first +second):\n%s", diff)
	}
	count := map[string]int{}
	long := 0
	for _, j := range a {
		count[j.Checkpoint]++
		if j.Steps == 60 {
			long++
		}
	}
	if count["a.safetensors"] < 120 || count["b.safetensors"] < 30 || long < 40 || long > 80 {
		t.Errorf("mix far from the weights: %v, %d long of 200", count, long)
	}
}

func TestParseCheckpoints(t *testing.T) {
	names, weights, err := parseCheckpoints("sd15.safetensors:3, sdxl.safetensors")
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]string{"sd15.safetensors", "sdxl.safetensors"}, names); diff != "" {
		t.Error(diff)
	}
	if diff := cmp.Diff([]int{3, 1}, weights); diff != "" {
		t.Error(diff)
	}
	for _, bad := range []string{"", "a:0", "a:x", "x/y.safetensors"} {
		if _, _, err := parseCheckpoints(bad); err == nil {
			t.Errorf("parseCheckpoints(%q): no error", bad)
		}
	}
}

// A made-up run on two servers: the figures are checked by hand.
func TestFigures(t *testing.T) {
	s := func(sec float64) int64 { return int64(sec * 1e9) }
	t0 := int64(1_000_000) * 1e9
	at := func(sec float64) int64 { return t0 + s(sec) }
	outs := []Outcome{
		{ID: "a", Status: "ok", Submit: at(0), Done: at(2)},
		{ID: "b", Status: "ok", Submit: at(0), Done: at(4)},
		{ID: "c", Status: "ok", Submit: at(0), Done: at(10)},
		{Status: "refused", Submit: at(1), Done: at(1.1), Err: "POST /prompt: 502"},
	}
	stats := []SimStats{
		// sim1 runs a (0-2), then c (6-10): c waited 0-6 while sim1 was
		// idle 2-6.
		{ModelLoads: 2, Runs: []SimRun{{"a", at(0), at(2), true, 1}, {"c", at(6), at(10), true, 1}}},
		// sim2 runs b (0-4), then c again (4-5): c completed twice.
		{ModelLoads: 1, Runs: []SimRun{{"b", at(0), at(4), true, 1}, {"c", at(4), at(5), true, 0}}},
	}
	r := figures("comfygate", 2, false, outs, stats, nil, nil)
	if r.OK != 3 || r.Refused != 1 || r.Lost != 0 {
		t.Errorf("ok %d refused %d lost %d, want 3 1 0", r.OK, r.Refused, r.Lost)
	}
	if r.MakespanS != 10 || r.PerMinute != 18 {
		t.Errorf("makespan %v, per minute %v; want 10 s and 18", r.MakespanS, r.PerMinute)
	}
	if r.ModelLoads != 3 || r.RunTwice != 1 || r.Restarted != 1 {
		t.Errorf("model loads %d, run twice %d, restarted %d; want 3 1 1", r.ModelLoads, r.RunTwice, r.Restarted)
	}
	// c waits from 0 to its last run at 6, less its run on sim2 (4-5):
	// waiting 0-4 and 5-6, 5 s. sim1 is busy 0-2 of it (2 of 5), sim2
	// 0-4 (4 of 5).
	if r.WaitingS < 4.99 || r.WaitingS > 5.01 {
		t.Errorf("waiting %v s, want 5", r.WaitingS)
	}
	got := []float64{r.PerServer[0].BusyWhileWaiting, r.PerServer[1].BusyWhileWaiting}
	if diff := cmp.Diff([]float64{0.4, 0.8}, got, cmpApprox); diff != "" {
		t.Errorf("busy while waiting (-want +got):\n%s", diff)
	}
	if r.BusyWhileWaitingMin < 0.399 || r.BusyWhileWaitingMin > 0.401 {
		t.Errorf("min busy while waiting %v, want 0.4", r.BusyWhileWaitingMin)
	}
	if p := r.problems(); len(p) != 2 {
		t.Errorf("problems %q, want the refused prompt and the one run twice", p)
	}
}

var cmpApprox = cmp.Comparer(func(a, b float64) bool { return a-b < 0.01 && b-a < 0.01 })

// The failover figures: the orphans of the killed server, when they were
// seen again elsewhere and started there.
func TestFiguresFailover(t *testing.T) {
	t0 := time.Unix(1_000_000, 0)
	at := func(sec float64) time.Time { return t0.Add(time.Duration(sec * float64(time.Second))) }
	ns := func(sec float64) int64 { return at(sec).UnixNano() }
	outs := []Outcome{
		{ID: "a", Status: "ok", Submit: ns(0), Done: ns(9)},
		{ID: "b", Status: "ok", Submit: ns(0), Done: ns(3)},
	}
	stats := []SimStats{
		{Runs: []SimRun{{"a", ns(0), 0, false, 1}}}, // killed at 2 while running a
		{Runs: []SimRun{{"b", ns(0), ns(3), true, 1}, {"a", ns(4), ns(9), true, 1}}},
	}
	seen := []map[string]time.Time{{"a": at(0)}, {"b": at(0), "a": at(2.5)}}
	kill := &killInfo{victim: 0, at: at(2), completed: 0, orphans: []string{"a"}}
	r := figures("comfygate", 2, true, outs, stats, seen, kill)
	want := &FailoverFigures{Victim: "sim1", KillAtS: 2, Orphans: 1, OrphanIDs: []string{"a"},
		Requeued: 1, RequeuedWithinS: 0.5, Restarted: 1, RestartedWithinS: 2, OrphansCompleted: 1}
	if diff := cmp.Diff(want, r.Kill, cmpApprox); diff != "" {
		t.Errorf("failover figures (-want +got):\n%s", diff)
	}
	if !r.PerServer[0].Killed || r.PerServer[0].BusyS < 1.99 || r.PerServer[0].BusyS > 2.01 {
		t.Errorf("killed server: %+v, want killed and busy 2 s (until it died)", r.PerServer[0])
	}
	if r.RunTwice != 0 || len(r.problems()) != 0 {
		t.Errorf("run twice %d, problems %q; want none", r.RunTwice, r.problems())
	}
}

func TestQuantile(t *testing.T) {
	v := []float64{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}
	if got := quantile(v, 0.5); got != 5 {
		t.Errorf("p50 = %v, want 5", got)
	}
	if got := quantile(v, 0.95); got != 10 {
		t.Errorf("p95 = %v, want 10", got)
	}
	if got := quantile(nil, 0.5); got != 0 {
		t.Errorf("p50 of nothing = %v", got)
	}
}

func TestParseCounters(t *testing.T) {
	text := `# HELP comfygate_fleet_prompts_stolen_total x
# TYPE comfygate_fleet_prompts_stolen_total counter
comfygate_fleet_prompts_stolen_total{from="sim1",to="sim2"} 3
comfygate_fleet_prompts_stolen_total{from="sim2",to="sim1"} 2
comfygate_fleet_prompts_resubmitted_total{from="sim1",to="sim2"} 1
comfygate_fleet_prompts_dispatched_total 7
comfygate_fleet_prompts_dispatched_totalx 100
`
	got := parseCounters(strings.NewReader(text), []string{
		"comfygate_fleet_prompts_dispatched_total", "comfygate_fleet_prompts_resubmitted_total", "comfygate_fleet_prompts_stolen_total",
	})
	if diff := cmp.Diff(map[string]float64{"stolen": 5, "resubmitted": 1, "dispatched": 7}, got); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
}

// The balancers' configurations are accepted by the installed nginx and
// HAProxy (skipped where they are not installed).
func TestConfigsAreAccepted(t *testing.T) {
	servers := []int{40001, 40002, 40003}
	if nginx, err := exec.LookPath("nginx"); err == nil {
		for _, lc := range []bool{false, true} {
			dir := t.TempDir()
			os.MkdirAll(filepath.Join(dir, "tmp"), 0o755)
			conf := filepath.Join(dir, "nginx.conf")
			os.WriteFile(conf, []byte(nginxConf(dir, 40000, servers, lc)), 0o644)
			if out, err := exec.Command(nginx, "-q", "-t", "-e", filepath.Join(dir, "error.log"), "-p", dir+"/", "-c", conf).CombinedOutput(); err != nil {
				t.Errorf("nginx -t (least_conn %v): %v\n%s", lc, err, out)
			}
		}
	} else {
		t.Log("nginx not installed: its configuration is not checked")
	}
	if haproxy, err := exec.LookPath("haproxy"); err == nil {
		conf := filepath.Join(t.TempDir(), "haproxy.cfg")
		os.WriteFile(conf, []byte(haproxyConf(40000, servers, "leastconn")), 0o644)
		if out, err := exec.Command(haproxy, "-q", "-c", "-f", conf).CombinedOutput(); err != nil {
			t.Errorf("haproxy -c: %v\n%s", err, out)
		}
	} else {
		t.Log("haproxy not installed: its configuration is not checked")
	}
	for _, c := range []string{nginxConf("/x", 40000, servers, true), haproxyConf(40000, servers, "leastconn")} {
		if strings.Contains(c, "0.0.0.0") || strings.Count(c, "127.0.0.1:") < 4 {
			t.Errorf("configuration not on loopback only:\n%s", c)
		}
	}
}

// The report renders from a results file without measuring.
func TestReport(t *testing.T) {
	res := &Results{
		Meta:   map[string]string{"date": "2026-01-01 00:00 UTC", "cpu": "test"},
		Config: Config{Servers: []int{1, 4}, PerServer: 10, ClientsPerServer: 2, StepTime: 50 * time.Millisecond, LoadTime: 2 * time.Second, FailoverServers: 4, StatsInterval: 200 * time.Millisecond, Mix: Mix{Checkpoints: []string{"a.safetensors"}, Weights: []int{1}, ShortSteps: 20, LongSteps: 60}},
		Runs: []*Run{
			{Target: "direct", Servers: 1, PerMinute: 20, ModelLoads: 6},
			{Target: "comfygate", Servers: 4, PerMinute: 80, ModelLoads: 10, BusyWhileWaitingMin: 0.8, PerServer: []ServerFigures{{Name: "sim1", BusyWhileWaiting: 0.8}}},
			{Target: "nginx-lc", Servers: 4, PerMinute: 70, ModelLoads: 17},
			{Target: "nginx-rr", Servers: 4, PerMinute: 65, ModelLoads: 22},
			{Target: "comfygate", Servers: 4, Failover: true, PerMinute: 60, Kill: &FailoverFigures{Victim: "sim4", Orphans: 2, Requeued: 2, RequeuedWithinS: 1.5}},
		},
	}
	md := page(res, "fleet.svg", "../bench/results/fleet.json", "Some notes.")
	for _, want := range []string{
		"| Throughput, 4 servers vs 1 server | ≥ 3.6× | 4.00× (80.0 vs 20.0 prompts/min) | **met** |",
		"| Throughput vs nginx `least_conn`, 4 servers | ≥ 1.3× | 1.14× (80.0 vs 70.0 prompts/min) | **missed**: 12 % short |",
		"| Model loads vs round robin, 4 servers | ≤ half | 10 vs 22 (45 %) | **met** |",
		"| Failover: orphans queued again elsewhere | within 10 s | 2 of 2 within 1.50 s",
		"## Analysis\n\nSome notes.",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("page lacks %q", want)
		}
	}
	if svg := chart(res); !strings.HasPrefix(svg, "<svg") || !strings.HasSuffix(svg, "</svg>\n") {
		t.Errorf("chart is not an SVG document")
	}
}
