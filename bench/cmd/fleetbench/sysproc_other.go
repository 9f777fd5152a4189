//go:build !linux

package main

import (
	"errors"
	"os/exec"
	"syscall"
)

// The fleet benchmark runs on Linux (bench/fleet.sh); elsewhere it builds
// but cannot start its processes.

func detach(*exec.Cmd) {}

func signalGroup(int, syscall.Signal) error {
	return errors.New("fleetbench: process groups need Linux")
}
