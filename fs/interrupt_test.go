package fs

import (
	"fmt"
	"os"
	"os/signal"
	"runtime"
	"syscall"
	"testing"
	"time"
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
