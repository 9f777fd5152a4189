package main

import (
	"fmt"
	"math"
	"slices"
	"sort"
	"time"
)

// Run is the figures of one target on one number of servers.
type Run struct {
	Target     string   `json:"target"`
	Servers    int      `json:"servers"`
	Failover   bool     `json:"failover,omitempty"`
	Clients    int      `json:"clients"`
	ServerURLs []string `json:"server_urls,omitempty"`

	Prompts int `json:"prompts"`
	OK      int `json:"ok"`
	// Lost: queued, but no image came back. Refused: POST /prompt (or the
	// socket before it) failed. Errors: any other failed request.
	Lost    int      `json:"lost"`
	Refused int      `json:"refused"`
	Errors  int      `json:"errors"`
	Samples []string `json:"error_samples,omitempty"`

	// MakespanS runs from the first POST /prompt to the last image read.
	MakespanS float64 `json:"makespan_s"`
	PerMinute float64 `json:"prompts_per_minute"` // images per minute of makespan
	// Submit (POST /prompt) to final image (GET /view done), ok prompts.
	P50S  float64 `json:"p50_s"`
	P95S  float64 `json:"p95_s"`
	MeanS float64 `json:"mean_s"`

	ModelLoads int `json:"model_loads"`
	// RunTwice: prompt ids that completed more than once (on any servers).
	// Restarted: ids that started more than once (cut short, then again).
	RunTwice  int `json:"run_twice"`
	Restarted int `json:"restarted"`

	// WaitingS is the time during which at least one prompt was waiting
	// (submitted, not running anywhere, not done). BusyWhileWaiting is,
	// per server, the share of that time it was running a prompt (model
	// loads included); Min and Mean are over the servers.
	WaitingS             float64 `json:"waiting_s"`
	BusyMean             float64 `json:"busy_mean"`
	BusyWhileWaitingMin  float64 `json:"busy_while_waiting_min"`
	BusyWhileWaitingMean float64 `json:"busy_while_waiting_mean"`

	PerServer []ServerFigures    `json:"per_server"`
	Gateway   map[string]float64 `json:"gateway,omitempty"` // comfygate's fleet counters
	Kill      *FailoverFigures   `json:"kill,omitempty"`
	Outcomes  []Outcome          `json:"outcomes"`
}

// ServerFigures are one simulated server's figures in a run.
type ServerFigures struct {
	Name             string  `json:"name"`
	Completed        int     `json:"completed"`
	ModelLoads       int     `json:"model_loads"`
	BusyS            float64 `json:"busy_s"`
	Busy             float64 `json:"busy"` // busy ÷ the time it was up during the run
	BusyWhileWaiting float64 `json:"busy_while_waiting"`
	Killed           bool    `json:"killed,omitempty"`
	// Runs is every prompt it started (its /sim/stats), for analysis.
	Runs []SimRun `json:"runs"`
}

// FailoverFigures are what happened when one server was killed.
type FailoverFigures struct {
	Victim          string  `json:"victim"`
	KillAtS         float64 `json:"kill_at_s"` // since the first POST
	CompletedAtKill int     `json:"completed_at_kill"`
	// Orphans are the prompts running or waiting on the victim when it
	// died. Requeued: seen queued or running on another server afterwards
	// (read every stats interval); Restarted: started running there.
	Orphans          int      `json:"orphans"`
	OrphanIDs        []string `json:"orphan_ids,omitempty"`
	Requeued         int      `json:"requeued"`
	RequeuedWithinS  float64  `json:"requeued_within_s"`
	Restarted        int      `json:"restarted"`
	RestartedWithinS float64  `json:"restarted_within_s"`
	OrphansCompleted int      `json:"orphans_completed"`
}

// problems are the functional errors of a run: any prompt that did not end
// in an image, and a prompt run twice, except where a failover makes them
// expected (a balancer loses the prompts of a dead server).
func (r *Run) problems() []string {
	var out []string
	if r.Failover && r.Target != "comfygate" {
		return nil
	}
	failed := r.Lost + r.Refused + r.Errors
	if r.Failover {
		// A POST /prompt in flight when the server died is answered 502
		// (never sent again: it may have reached the server): the client
		// knows, so it is counted, not a functional error.
		failed -= r.Refused
	}
	if n := failed; n > 0 {
		out = append(out, fmt.Sprintf("%d of %d prompts failed (lost %d, refused %d, errors %d); first: %v", n, r.Prompts, r.Lost, r.Refused, r.Errors, r.Samples))
	}
	if r.RunTwice > 0 {
		out = append(out, fmt.Sprintf("%d prompt(s) completed twice", r.RunTwice))
	}
	return out
}

// tick is the resolution of the busy-while-waiting accounting.
const tick = 10 * time.Millisecond

// figures computes a run's figures from what the clients saw and what the
// servers ran.
func figures(target string, n int, failover bool, outs []Outcome, stats []SimStats, seen []map[string]time.Time, kill *killInfo) *Run {
	r := &Run{Target: target, Servers: n, Failover: failover, Prompts: len(outs), Outcomes: outs}
	var t0, t1 int64 = math.MaxInt64, 0
	var lat []float64
	for _, o := range outs {
		if o.Submit == 0 {
			continue
		}
		t0 = min(t0, o.Submit)
		t1 = max(t1, o.Done)
		switch o.Status {
		case "ok":
			r.OK++
			lat = append(lat, float64(o.Done-o.Submit)/1e9)
		case "lost":
			r.Lost++
		case "refused":
			r.Refused++
		default:
			r.Errors++
		}
		if o.Status != "ok" && len(r.Samples) < 3 {
			r.Samples = append(r.Samples, o.Err)
		}
	}
	if t1 <= t0 {
		return r
	}
	r.MakespanS = float64(t1-t0) / 1e9
	r.PerMinute = float64(r.OK) / r.MakespanS * 60
	sort.Float64s(lat)
	r.P50S, r.P95S = quantile(lat, 0.5), quantile(lat, 0.95)
	for _, v := range lat {
		r.MeanS += v / float64(len(lat))
	}

	killAt := int64(math.MaxInt64)
	if kill != nil {
		killAt = kill.at.UnixNano()
	}
	// Every run of every prompt id, across the servers.
	type run struct {
		server     int
		start, end int64
		completed  bool
	}
	runs := map[string][]run{}
	nt := int((t1-t0)/int64(tick)) + 1
	busy := make([][]bool, n)
	upTicks := make([]int, n)
	for i, s := range stats {
		busy[i] = make([]bool, nt)
		end := t1
		if kill != nil && kill.victim == i {
			end = killAt
		}
		f := ServerFigures{Name: fmt.Sprintf("sim%d", i+1), ModelLoads: s.ModelLoads, Killed: kill != nil && kill.victim == i, Runs: s.Runs}
		r.ModelLoads += s.ModelLoads
		for _, x := range s.Runs {
			e := x.End
			if e == 0 {
				e = end
			}
			runs[x.PromptID] = append(runs[x.PromptID], run{i, x.Start, e, x.Completed})
			if x.Completed {
				f.Completed++
			}
			a, b := max(x.Start, t0), min(e, end)
			if b > a {
				f.BusyS += float64(b-a) / 1e9
				for k := (a - t0) / int64(tick); k < (b-t0)/int64(tick) && k < int64(nt); k++ {
					busy[i][k] = true
				}
			}
		}
		upTicks[i] = int(min((end-t0)/int64(tick), int64(nt)))
		if end > t0 {
			f.Busy = f.BusyS / (float64(end-t0) / 1e9)
		}
		r.PerServer = append(r.PerServer, f)
		r.BusyMean += f.Busy / float64(n)
	}
	for _, rs := range runs {
		c := 0
		for _, x := range rs {
			if x.completed {
				c++
			}
		}
		if c > 1 {
			r.RunTwice++
		}
		if len(rs) > 1 {
			r.Restarted++
		}
	}

	// Waiting: from POST /prompt to the start of the prompt's last run,
	// less the time it ran before (a run cut short by a failover); a
	// prompt that never ran waits until its client gave up.
	diff := make([]int, nt+1)
	mark := func(a, b int64) {
		a, b = max(a, t0), min(b, t1)
		if b <= a {
			return
		}
		diff[(a-t0)/int64(tick)]++
		diff[(b-t0)/int64(tick)]--
	}
	for _, o := range outs {
		if o.Submit == 0 || (o.ID == "" && o.Status != "ok") {
			continue
		}
		rs := runs[o.ID]
		slices.SortFunc(rs, func(a, b run) int { return int(a.start - b.start) })
		from := o.Submit
		if len(rs) == 0 {
			mark(from, o.Done)
			continue
		}
		for _, x := range rs {
			mark(from, x.start)
			from = max(from, x.end)
		}
	}
	waiting := make([]int, nt)
	c := 0
	for k := range nt {
		c += diff[k]
		waiting[k] = c
	}
	var waitTicks int
	for k := range nt {
		if waiting[k] > 0 {
			waitTicks++
		}
	}
	r.WaitingS = float64(waitTicks) * tick.Seconds()
	r.BusyWhileWaitingMin = 1
	for i := range n {
		var w, bw int
		for k := 0; k < upTicks[i]; k++ {
			if waiting[k] > 0 {
				w++
				if busy[i][k] {
					bw++
				}
			}
		}
		f := 1.0
		if w > 0 {
			f = float64(bw) / float64(w)
		}
		r.PerServer[i].BusyWhileWaiting = f
		r.BusyWhileWaitingMin = min(r.BusyWhileWaitingMin, f)
		r.BusyWhileWaitingMean += f / float64(n)
	}

	if kill != nil {
		ff := &FailoverFigures{
			Victim: fmt.Sprintf("sim%d", kill.victim+1), KillAtS: float64(killAt-t0) / 1e9,
			CompletedAtKill: kill.completed, Orphans: len(kill.orphans), OrphanIDs: kill.orphans,
		}
		for _, id := range kill.orphans {
			var requeued, restarted int64
			for i, m := range seen {
				if i == kill.victim {
					continue
				}
				if t, ok := m[id]; ok && (requeued == 0 || t.UnixNano() < requeued) {
					requeued = t.UnixNano()
				}
			}
			done := false
			for _, x := range runs[id] {
				if x.server == kill.victim {
					continue
				}
				if restarted == 0 || x.start < restarted {
					restarted = x.start
				}
				done = done || x.completed
			}
			if requeued != 0 {
				ff.Requeued++
				ff.RequeuedWithinS = max(ff.RequeuedWithinS, float64(requeued-killAt)/1e9)
			}
			if restarted != 0 {
				ff.Restarted++
				ff.RestartedWithinS = max(ff.RestartedWithinS, float64(restarted-killAt)/1e9)
			}
			if done {
				ff.OrphansCompleted++
			}
		}
		r.Kill = ff
	}
	return r
}

// quantile is the nearest-rank quantile of sorted values.
func quantile(sorted []float64, q float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	k := int(math.Ceil(q*float64(len(sorted)))) - 1
	return sorted[max(0, min(k, len(sorted)-1))]
}
