package fs

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"runtime"
	"syscall"
	"testing"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
)

// TestStatUnderSignals: stat of head.raw, which walks the head's
// allocation map for st_blocks, answers however many signals its caller
// gets meanwhile. The kernel interrupts a request for each signal, and an
// EINTR in reply would fail the stat, which few programs retry (qemu-img
// does not, when it opens head.raw). syscall.Stat, unlike os.Stat, does not
// retry either.
func TestStatUnderSignals(t *testing.T) {
	store := newStore(t)
	// Data in 64 L2 tables: each stat walks them all.
	var writes []string
	for i := range 64 {
		writes = append(writes, fmt.Sprintf("write -P 1 %d 4k", int64(i)<<34))
	}
	newVolume(t, store, "big", 1<<40, writes...)
	m := testMount(t, store)
	head := m.path("volumes", "big", "head.raw")

	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGUSR1)
	defer signal.Stop(signals)
	go func() {
		for range signals {
		}
	}()
	tids := make(chan int)
	errs := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		tids <- syscall.Gettid()
		var err error
		for range 200 {
			var st syscall.Stat_t
			if err = syscall.Stat(head, &st); err != nil {
				break
			}
		}
		errs <- err
	}()
	tid := <-tids
	tick := time.NewTicker(100 * time.Microsecond)
	defer tick.Stop()
	for {
		select {
		case err := <-errs:
			if err != nil {
				t.Fatalf("stat of head.raw while signals came: %v", err)
			}
			return
		case <-tick.C:
			syscall.Tgkill(os.Getpid(), tid, syscall.SIGUSR1)
		}
	}
}

// TestSteadyContext: the context of a request's work outlives an
// interrupt while the caller lives, and ends once the caller is killed.
func TestSteadyContext(t *testing.T) {
	caller := exec.Command("sleep", "60")
	if err := caller.Start(); err != nil {
		t.Fatal(err)
	}
	defer caller.Process.Kill()
	fsys := &filesystem{ctx: context.Background()}
	request, interrupt := context.WithCancel(fuse.NewContext(context.Background(), &fuse.Caller{Pid: uint32(caller.Process.Pid)}))
	work, done := fsys.steadyContext(request)
	defer done()

	interrupt()
	select {
	case <-work.Done():
		t.Fatal("the work ended at an interrupt of a caller that lives on")
	case <-time.After(500 * time.Millisecond):
	}
	caller.Process.Kill()
	caller.Wait()
	select {
	case <-work.Done():
	case <-time.After(time.Minute):
		t.Fatal("the work went on for a minute after its caller was killed")
	}
}
