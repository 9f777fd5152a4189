package main

import (
	"os/exec"
	"syscall"
)

// detach puts the process in a process group of its own (so that stopping
// it stops its children too: nginx's workers) and has the kernel kill it
// if fleetbench dies first.
func detach(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
}

// signalGroup sends sig to the process group led by pid.
func signalGroup(pid int, sig syscall.Signal) error {
	return syscall.Kill(-pid, sig)
}
