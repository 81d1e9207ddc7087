package proc

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Info is what /proc/PID/stat says of a process's place: its parent,
// process group and session (as seen from berth's pid namespace), and its
// state letter ('Z' for a zombie).
type Info struct {
	Pid, PPid, Pgrp, Session int
	State                    byte
}

// ReadInfo reads pid's Info.
func ReadInfo(pid int) (Info, error) {
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return Info{}, err
	}
	s := string(data)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return Info{}, fmt.Errorf("parse /proc/%d/stat: no command field", pid)
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 4 || len(f[0]) != 1 {
		return Info{}, fmt.Errorf("parse /proc/%d/stat: %d fields", pid, len(f))
	}
	info := Info{Pid: pid, State: f[0][0]}
	for j, dst := range []*int{&info.PPid, &info.Pgrp, &info.Session} {
		if *dst, err = strconv.Atoi(f[j+1]); err != nil {
			return Info{}, fmt.Errorf("parse /proc/%d/stat: %w", pid, err)
		}
	}
	return info, nil
}

// AllPids lists every process of the node.
func AllPids() ([]int, error) {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil, err
	}
	pids := make([]int, 0, len(entries))
	for _, e := range entries {
		if pid, err := strconv.Atoi(e.Name()); err == nil {
			pids = append(pids, pid)
		}
	}
	return pids, nil
}

// SessionMembers lists the live processes of session sid, other than its
// leader.
func SessionMembers(sid int) []int {
	pids, err := AllPids()
	if err != nil {
		return nil
	}
	var out []int
	for _, pid := range pids {
		if pid == sid {
			continue
		}
		if info, err := ReadInfo(pid); err == nil && info.Session == sid {
			out = append(out, pid)
		}
	}
	return out
}

// KillAll sends SIGKILL to every live process among candidates() that
// match accepts, again and again (a process may fork while it is being
// killed), until none is left; zombies count as gone. It gives up with an
// error when ctx ends first.
func KillAll(ctx context.Context, candidates func() ([]int, error), match func(Info) bool) error {
	for delay := time.Millisecond; ; delay = min(delay*2, 50*time.Millisecond) {
		pids, err := candidates()
		if err != nil {
			return err
		}
		left := 0
		for _, pid := range pids {
			info, err := ReadInfo(pid)
			if err != nil || info.State == 'Z' || !match(info) {
				continue
			}
			left++
			_ = unix.Kill(pid, unix.SIGKILL)
		}
		if left == 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%d processes still alive after SIGKILL: %w", left, ctx.Err())
		case <-time.After(delay):
		}
	}
}
