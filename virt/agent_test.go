//go:build libvirt && cgo

package virt

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"snapfs/snapshot"
)

// killAgentOnFreeze starts a watcher in the guest that kills qemu-ga
// (SIGKILL) delay after a freeze begins: qemu-ga writes qga.state.isfrozen
// before its FIFREEZE calls, so with no delay the agent dies with none,
// some or all of the filesystems frozen. (SIGTERM would not do: qemu-ga
// ignores it while frozen.) A killed agent leaves the filesystems frozen;
// the guest's init restarts qemu-ga after 0.5 s, and the new one finds the
// frozen state in its state dir, reports it and can thaw. The console
// shows SNAPFS-AGENT-KILLED when it struck.
func (g *guest) killAgentOnFreeze(delay time.Duration) {
	g.t.Helper()
	g.exec(fmt.Sprintf(`while [ ! -e /run/qga.state.isfrozen ]; do usleep 1000; done; usleep %d; kill -KILL $(pidof qemu-ga); echo SNAPFS-AGENT-KILLED >/dev/ttyS0`,
		delay.Microseconds()))
	// Let the watcher start polling (guest-exec returns before it runs).
	time.Sleep(500 * time.Millisecond)
}

// slowSnapshot makes the provider wait d while the guest is frozen, before
// it snapshots the disks, for the rest of the test.
func slowSnapshot(t *testing.T, d time.Duration) {
	testHookFrozen = func() { time.Sleep(d) }
	t.Cleanup(func() { testHookFrozen = nil })
}

// assertThawed checks that the guest is not left frozen: the (possibly
// restarted) agent reports it thawed, and it writes to its disks again.
func (g *guest) assertThawed() {
	g.t.Helper()
	if st := g.freezeStatus(30 * time.Second); st != "thawed" {
		g.t.Errorf("guest left %s", st)
	}
	g.waitHeartbeats(3, time.Minute)
}

// assertHonest checks a snapshot against its claim: a snapshot recorded
// quiesced must hold clean filesystems. (A crash-consistent one may hold
// clean ones too: the provider claims only what the agent vouched for.)
func assertHonest(t *testing.T, rec Record) {
	t.Helper()
	for dev, layer := range rec.Layers() {
		needsRecovery, clean := ext4State(t, rawOf(t, layer))
		t.Logf("%s: %s, needs_recovery %v, e2fsck clean %v", dev, rec.Consistency, needsRecovery, clean)
		if rec.Consistency == snapshot.Quiesced && (needsRecovery || !clean) {
			t.Errorf("%s: recorded quiesced, but the journal needs recovery or e2fsck finds errors", dev)
		}
	}
}

// TestAgentKilledDuringFreeze: qemu-ga dies (SIGKILL) the moment the freeze
// begins, and then, in a second snapshot, after the freeze succeeded
// (while the snapshot is slowed down). Whatever it had frozen, the thaw is
// attempted and retried until the restarted agent thaws it; each snapshot
// is taken (the fallback) and recorded quiesced only if an agent vouched
// for the freeze after the disk snapshots, crash-consistent otherwise, and
// its disks agree with the claim. With the new agent, snapshots are
// quiesced again.
func TestAgentKilledDuringFreeze(t *testing.T) {
	g := newGuest(t, 2)
	p := testProvider(t, Config{})
	ctx := testCtx(t)

	for i, delay := range []time.Duration{0, 500 * time.Millisecond} {
		name := fmt.Sprintf("killed-%d", i)
		if delay > 0 {
			slowSnapshot(t, 2500*time.Millisecond)
		}
		before := strings.Count(readFile(t, g.console), "SNAPFS-AGENT-KILLED")
		g.killAgentOnFreeze(delay)
		rec, err := p.SnapshotDisks(ctx, g.name, name, SnapshotOptions{})
		testHookFrozen = nil
		if err != nil {
			t.Fatal(err)
		}
		if strings.Count(readFile(t, g.console), "SNAPFS-AGENT-KILLED") != before+1 {
			t.Fatalf("%s: the agent was not killed: the test proves nothing", name)
		}
		t.Logf("%s: agent killed %v into the freeze: %s (%s), frozen %v", name, delay, rec.Consistency, rec.Why, rec.Frozen)
		if rec.Consistency != snapshot.Quiesced && rec.Why == "" {
			t.Errorf("%s: %s without a reason", name, rec.Consistency)
		}
		g.assertThawed()
		assertHonest(t, rec)
	}

	again, err := p.SnapshotDisks(ctx, g.name, "again", SnapshotOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if again.Consistency != snapshot.Quiesced {
		t.Errorf("with the restarted agent: %s (%s)", again.Consistency, again.Why)
	}
	g.assertThawed()
}

// TestFreezeLostBeforeSnapshot: the freeze succeeds, but is gone by the
// time the disks are snapshotted (the snapshot is slowed down by a test
// hook): first because the window timer (FreezeTimeout 1 s) thaws the
// guest, then because someone else thaws it through libvirt (the agent
// then reports it thawed). Either way
// the guest writes again when the disks are taken: the snapshot is
// recorded crash-consistent, and its disks show that this is right
// (their journals need recovery). With RequireQuiesce, such a snapshot is
// refused after the fact and taken back out of the running disk chain by
// block commit: no record, the disks back on their files.
func TestFreezeLostBeforeSnapshot(t *testing.T) {
	g := newGuest(t, 2)
	ctx := testCtx(t)
	cases := []struct {
		name    string
		window  time.Duration
		thawer  func()
		require bool
		why     string
	}{
		{"timer", time.Second, func() { time.Sleep(2500 * time.Millisecond) }, false, "window"},
		{"thawed", time.Minute, func() {
			if err := g.dom.FSThaw(nil, 0); err != nil {
				t.Errorf("third-party thaw: %v", err)
			}
			time.Sleep(time.Second)
		}, false, "thawed"},
		{"refused", time.Second, func() { time.Sleep(2500 * time.Millisecond) }, true, ""},
	}
	for _, c := range cases {
		p := testProvider(t, Config{FreezeTimeout: c.window, RequireQuiesce: c.require})
		before, err := p.Disks(ctx, g.name)
		if err != nil {
			t.Fatal(err)
		}
		testHookFrozen = c.thawer
		rec, err := p.SnapshotDisks(ctx, g.name, c.name, SnapshotOptions{})
		testHookFrozen = nil
		if c.require {
			if !errors.Is(err, ErrAgent) || !errors.Is(err, snapshot.ErrUnsupported) {
				t.Fatalf("%s: got %v, want an error wrapping ErrAgent and snapshot.ErrUnsupported", c.name, err)
			}
			t.Logf("%s: %v", c.name, err)
			if recs, err := p.Records(ctx, g.name); err != nil || len(recs) != 0 {
				t.Errorf("%s: records after a refused snapshot: %+v, %v", c.name, recs, err)
			}
			after, err := p.Disks(ctx, g.name)
			if err != nil {
				t.Fatal(err)
			}
			for i := range after {
				if after[i].Path != before[i].Path {
					t.Errorf("%s: the disk moved from %s to %s: the refused snapshot left an overlay", c.name, before[i].Path, after[i].Path)
				}
				run(t, "qemu-img", "check", "-U", after[i].Path)
			}
			g.assertThawed()
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("%s: %s (%s), frozen %v", c.name, rec.Consistency, rec.Why, rec.Frozen)
		if rec.Consistency != snapshot.CrashConsistent || !strings.Contains(rec.Why, c.why) {
			t.Errorf("%s: %s (%s), want crash-consistent: %s", c.name, rec.Consistency, rec.Why, c.why)
		}
		if c.name == "timer" && rec.Frozen > 2*time.Second {
			t.Errorf("%s: frozen %v, beyond the 1 s window", c.name, rec.Frozen)
		}
		g.assertThawed()
		recovery := false
		for _, layer := range rec.Layers() {
			needsRecovery, _ := ext4State(t, rawOf(t, layer))
			recovery = recovery || needsRecovery
		}
		if !recovery {
			t.Errorf("%s: no disk of the snapshot needs recovery: the guest was still frozen, the test proves nothing", c.name)
		}
	}
}

// TestAgentHungFreezeIsBounded: the agent hangs in the middle of the
// freeze (its freeze hook takes 5 s, as a database flush might), and then
// freezes the filesystems after all. With a 1 s agent timeout the freeze
// call fails after 1 s instead of waiting for ever, the snapshot falls back
// to crash-consistent, and the thaw, retried until the agent answers
// again, thaws what it froze late.
func TestAgentHungFreezeIsBounded(t *testing.T) {
	g := newGuest(t, 1, "snapfs.freeze_hook")
	p := testProvider(t, Config{AgentTimeout: time.Second, FreezeTimeout: 2 * time.Second, ThawTimeout: 30 * time.Second})
	ctx := testCtx(t)

	g.execOutput(`printf '#!/bin/sh\n[ "$1" = freeze ] && echo SNAPFS-HOOK-HUNG >/dev/ttyS0 && sleep 5\nexit 0\n' >/run/freeze-hook; chmod +x /run/freeze-hook`)
	t0 := time.Now()
	rec, err := p.SnapshotDisks(ctx, g.name, "hung", SnapshotOptions{})
	took := time.Since(t0)
	if err != nil {
		t.Fatal(err)
	}
	if !g.consoleHas("SNAPFS-HOOK-HUNG") {
		t.Fatal("the freeze hook did not run: the test proves nothing")
	}
	t.Logf("with the agent hung: %s (%s) in %v, frozen %v", rec.Consistency, rec.Why, took, rec.Frozen)
	if rec.Consistency != snapshot.CrashConsistent || !strings.Contains(rec.Why, "not frozen") {
		t.Errorf("consistency %s (%s), want crash-consistent: not frozen", rec.Consistency, rec.Why)
	}
	if took > 30*time.Second {
		t.Errorf("the snapshot took %v: the hung agent was not bounded", took)
	}
	g.assertThawed()
}
