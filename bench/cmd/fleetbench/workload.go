package main

import (
	"fmt"
	"math/rand/v2"
	"strconv"
	"strings"
)

// Job is one prompt of the workload: the standard txt2img graph
// (comfytest.Txt2Img) with a checkpoint and a number of KSampler steps.
type Job struct {
	Checkpoint string `json:"checkpoint"`
	Steps      int    `json:"steps"`
}

// Mix describes a workload: which checkpoints, how often each, and the
// share of long prompts.
type Mix struct {
	// Checkpoints and their weights (relative frequencies).
	Checkpoints []string `json:"checkpoints"`
	Weights     []int    `json:"weights"`
	// ShortSteps and LongSteps are the KSampler steps of a short and a
	// long prompt; LongShare is the fraction of long ones.
	ShortSteps int     `json:"short_steps"`
	LongSteps  int     `json:"long_steps"`
	LongShare  float64 `json:"long_share"`
	Seed       uint64  `json:"seed"`
}

// parseCheckpoints reads NAME:WEIGHT,NAME:WEIGHT (a missing weight is 1).
func parseCheckpoints(s string) (names []string, weights []int, err error) {
	for part := range strings.SplitSeq(s, ",") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		name, w, ok := strings.Cut(part, ":")
		weight := 1
		if ok {
			weight, err = strconv.Atoi(w)
			if err != nil || weight < 1 {
				return nil, nil, fmt.Errorf("checkpoint %q: weight must be a positive integer", part)
			}
		}
		if name == "" || strings.ContainsAny(name, ";=/\\") {
			return nil, nil, fmt.Errorf("checkpoint %q: bad file name", part)
		}
		names = append(names, name)
		weights = append(weights, weight)
	}
	if len(names) == 0 {
		return nil, nil, fmt.Errorf("no checkpoint given")
	}
	return names, weights, nil
}

// Jobs returns the workload of n prompts: the same sequence for the same
// mix and n, whatever the target, so every target runs the same prompts in
// the same order.
func (m Mix) Jobs(n int) []Job {
	r := rand.New(rand.NewPCG(m.Seed, uint64(n)))
	total := 0
	for _, w := range m.Weights {
		total += w
	}
	jobs := make([]Job, n)
	for i := range jobs {
		x := r.IntN(total)
		k := 0
		for x >= m.Weights[k] {
			x -= m.Weights[k]
			k++
		}
		steps := m.ShortSteps
		if r.Float64() < m.LongShare {
			steps = m.LongSteps
		}
		jobs[i] = Job{Checkpoint: m.Checkpoints[k], Steps: steps}
	}
	return jobs
}
