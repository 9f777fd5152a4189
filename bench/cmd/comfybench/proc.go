package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// Process accounting from /proc: CPU time (utime+stime) and resident memory
// of a process and all its descendants (nginx: master and workers).

const clockTicks = 100 // USER_HZ; fixed at 100 on Linux for /proc/<pid>/stat

// procTree returns root and every descendant of root.
func procTree(root int) []int {
	if root <= 0 {
		return nil
	}
	children := map[int][]int{}
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		f := statFields(pid)
		if len(f) < 2 {
			continue
		}
		ppid, _ := strconv.Atoi(f[1])
		children[ppid] = append(children[ppid], pid)
	}
	out := []int{root}
	for i := 0; i < len(out) && i < 1000; i++ {
		out = append(out, children[out[i]]...)
	}
	return out
}

// statFields returns the fields of /proc/pid/stat after the command name:
// f[0] is the state (field 3), f[1] ppid (field 4), f[11] utime (field 14).
func statFields(pid int) []string {
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	if err != nil {
		return nil
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return nil
	}
	return strings.Fields(string(b[i+1:]))
}

// cpuSeconds is the CPU time used so far by the processes.
func cpuSeconds(pids []int) float64 {
	var ticks int64
	for _, pid := range pids {
		f := statFields(pid)
		if len(f) < 13 {
			continue
		}
		u, _ := strconv.ParseInt(f[11], 10, 64)
		s, _ := strconv.ParseInt(f[12], 10, 64)
		ticks += u + s
	}
	return float64(ticks) / clockTicks
}

// memKB sums a /proc/pid/status field (VmRSS, VmHWM) in KiB.
func memKB(pids []int, field string) int64 {
	var total int64
	for _, pid := range pids {
		b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "status"))
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(line, field+":") {
				f := strings.Fields(line[len(field)+1:])
				if len(f) > 0 {
					n, _ := strconv.ParseInt(f[0], 10, 64)
					total += n
				}
				break
			}
		}
	}
	return total
}

// machineBusySeconds is the CPU time all processors spent busy (not idle or
// waiting for I/O) since boot, from the first line of /proc/stat.
func machineBusySeconds() float64 {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	var ticks int64
	for i, v := range f[1:] {
		if i == 3 || i == 4 { // idle, iowait
			continue
		}
		if i >= 8 { // guest time is already counted in user
			break
		}
		n, _ := strconv.ParseInt(v, 10, 64)
		ticks += n
	}
	return float64(ticks) / clockTicks
}

// foreignLoad measures how much CPU processes other than the ones under
// test (and this one) use during a measurement: noise the report shows.
type foreignLoad struct {
	busy, mine float64
	pids       []int
}

func startForeign(pids ...[]int) foreignLoad {
	f := foreignLoad{pids: []int{os.Getpid()}}
	for _, p := range pids {
		f.pids = append(f.pids, p...)
	}
	f.busy, f.mine = machineBusySeconds(), cpuSeconds(f.pids)
	return f
}

// cores returns the CPU used by other processes since start, in cores.
func (f foreignLoad) cores(seconds float64) float64 {
	other := (machineBusySeconds() - f.busy) - (cpuSeconds(f.pids) - f.mine)
	return max(0, other/seconds)
}
