//go:build linux

package lab

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"
)

// StopTimeout is how long Stop waits after SIGTERM before SIGKILL.
const StopTimeout = 5 * time.Second

// ProcConfig describes a process to start inside a namespace.
type ProcConfig struct {
	// Name labels the process in logs ("gateway", "agent", ...).
	Name string
	// Args is the command line; Args[0] is looked up in PATH.
	Args []string
	// Env is added to the lab process's environment.
	Env []string
	// LogPath, when set, also receives stdout and stderr.
	LogPath string
	// Stdout, when set, receives stdout only (in addition to the log).
	Stdout io.Writer
}

// Process is a command running inside a namespace via `ip netns exec`
// (which execs the command itself, so the PID is the command's own).
type Process struct {
	Name string
	NS   string
	Args []string

	cmd     *exec.Cmd
	log     *syncBuffer
	logFile *os.File
	done    chan struct{}
	waitErr error
	stopMu  sync.Mutex
	killed  bool // Stop had to use SIGKILL
}

type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// StartProcess starts cfg.Args inside ns. Prefer (*Lab).Start, which also
// stops the process on Close.
func StartProcess(ns string, cfg ProcConfig) (*Process, error) {
	if len(cfg.Args) == 0 {
		return nil, errors.New("lab: no command")
	}
	p := &Process{Name: cfg.Name, NS: ns, Args: cfg.Args, log: &syncBuffer{}, done: make(chan struct{})}
	if p.Name == "" {
		p.Name = cfg.Args[0]
	}
	var logW io.Writer = p.log
	if cfg.LogPath != "" {
		f, err := os.OpenFile(cfg.LogPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
		if err != nil {
			return nil, err
		}
		p.logFile = f
		logW = io.MultiWriter(p.log, f)
	}
	args := append([]string{"netns", "exec", ns}, cfg.Args...)
	cmd := exec.Command("ip", args...)
	cmd.Env = append(os.Environ(), cfg.Env...)
	cmd.Stderr = logW
	if cfg.Stdout != nil {
		cmd.Stdout = io.MultiWriter(logW, cfg.Stdout)
	} else {
		cmd.Stdout = logW
	}
	// If the lab process dies, take the child with it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	// A grandchild that outlives the process (e.g. an sshd session) keeps
	// the output pipe open: do not let that block Wait (and Stop) forever.
	cmd.WaitDelay = StopTimeout
	if err := cmd.Start(); err != nil {
		if p.logFile != nil {
			p.logFile.Close()
		}
		return nil, fmt.Errorf("lab: start %s in %s: %w", p.Name, ns, err)
	}
	p.cmd = cmd
	go func() {
		p.waitErr = cmd.Wait()
		if p.logFile != nil {
			p.logFile.Close()
		}
		close(p.done)
	}()
	return p, nil
}

// Start starts a process inside ns; Close stops it.
func (l *Lab) Start(ns string, cfg ProcConfig) (*Process, error) {
	l.mu.Lock()
	closed := l.closed
	l.mu.Unlock()
	if closed {
		return nil, errors.New("lab: closed")
	}
	p, err := StartProcess(ns, cfg)
	if err != nil {
		return nil, err
	}
	l.mu.Lock()
	l.procs = append(l.procs, p)
	l.mu.Unlock()
	return p, nil
}

// PID returns the process ID.
func (p *Process) PID() int { return p.cmd.Process.Pid }

// Done is closed when the process has exited.
func (p *Process) Done() <-chan struct{} { return p.done }

// Running reports whether the process has not exited yet.
func (p *Process) Running() bool {
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

// ExitCode returns the exit code, -1 while running or when killed by a signal.
func (p *Process) ExitCode() int {
	if p.Running() {
		return -1
	}
	return p.cmd.ProcessState.ExitCode()
}

// Err returns the error from Wait (nil while running or on exit 0).
func (p *Process) Err() error {
	if p.Running() {
		return nil
	}
	return p.waitErr
}

// Wait waits for the process to exit, at most d. It reports whether it exited.
func (p *Process) Wait(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-p.done:
		return true
	case <-t.C:
		return false
	}
}

// Log returns everything the process wrote to stdout and stderr so far.
func (p *Process) Log() string { return p.log.String() }

// WaitLog waits until the log contains substr, the process exits, or ctx ends.
func (p *Process) WaitLog(ctx context.Context, substr string) error {
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		if strings.Contains(p.Log(), substr) {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: %q not in log: %w", p.Name, substr, ctx.Err())
		case <-p.done:
			if strings.Contains(p.Log(), substr) {
				return nil
			}
			return fmt.Errorf("%s exited (%v) before logging %q", p.Name, p.waitErr, substr)
		case <-tick.C:
		}
	}
}

// Signal sends sig to the process (by PID), if it is still running.
func (p *Process) Signal(sig syscall.Signal) error {
	if !p.Running() {
		return nil
	}
	return p.cmd.Process.Signal(sig)
}

// Stop sends SIGTERM, waits up to StopTimeout, then SIGKILL; by PID only.
// It returns the exit code (-1 if killed by a signal). Safe to call twice.
func (p *Process) Stop() int {
	p.stopMu.Lock()
	defer p.stopMu.Unlock()
	if p.Running() {
		_ = p.cmd.Process.Signal(syscall.SIGTERM)
		if !p.Wait(StopTimeout) {
			p.killed = true
			_ = p.cmd.Process.Kill()
			<-p.done
		}
	}
	return p.ExitCode()
}

// Killed reports whether Stop had to SIGKILL the process because it did
// not exit within StopTimeout of SIGTERM.
func (p *Process) Killed() bool {
	p.stopMu.Lock()
	defer p.stopMu.Unlock()
	return p.killed
}

// ExitStatus describes how the process ended: "exit 0", "signal: terminated",
// "killed after SIGTERM timeout", or "running".
func (p *Process) ExitStatus() string {
	if p.Running() {
		return "running"
	}
	if p.Killed() {
		return "SIGKILLed: did not exit within 5s of SIGTERM"
	}
	return p.cmd.ProcessState.String()
}

// String describes the process for logs.
func (p *Process) String() string {
	return fmt.Sprintf("%s [pid %d, netns %s]: %s", p.Name, p.PID(), p.NS, strings.Join(p.Args, " "))
}

// Run runs a command inside ns to completion (bounded by ctx and at most
// 2 minutes) and returns stdout and stderr separately.
func Run(ctx context.Context, ns string, args ...string) (stdout, stderr []byte, err error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", ns}, args...)...)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	cmd.WaitDelay = 2 * time.Second
	err = cmd.Run()
	if err != nil {
		err = fmt.Errorf("[%s] %s: %w: %s", ns, strings.Join(args, " "), err, bytes.TrimSpace(e.Bytes()))
	}
	return o.Bytes(), e.Bytes(), err
}

// Output runs a command inside ns and returns its combined output.
func Output(ctx context.Context, ns string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", ns}, args...)...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	cmd.WaitDelay = 2 * time.Second
	out, err := cmd.CombinedOutput()
	if err != nil {
		err = fmt.Errorf("[%s] %s: %w: %s", ns, strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return string(out), err
}
