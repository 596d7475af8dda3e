//go:build libvirt && cgo

package virt

import (
	"fmt"
	"slices"
	"testing"
	"time"

	"snapfs/snapshot"
)

// BenchmarkSnapshotRunning measures what mkdir instances/I/snapshots/S
// costs on a running guest with two ext4 disks under continuous writes:
// the latency of a quiesced SnapshotDisks (the mkdir, without the FUSE
// round trip) and the guest's frozen window, from the start of the freeze
// call to the end of the thaw. Each snapshot is deleted again (block
// commit, not timed) so that the chain stays short. Target: frozen window
// p50 under 200 ms.
//
//	go test -tags libvirt -run '^$' -bench SnapshotRunning -benchtime 20x ./virt
func BenchmarkSnapshotRunning(b *testing.B) {
	g := newGuest(b, 2)
	p := testProvider(b, Config{})
	ctx := testCtx(b)
	var latency, frozen, freeze, snap, verify, thaw []time.Duration
	b.ResetTimer()
	for i := range b.N {
		name := fmt.Sprintf("bench-%d", i)
		t0 := time.Now()
		rec, err := p.SnapshotDisks(ctx, g.name, name, SnapshotOptions{})
		latency = append(latency, time.Since(t0))
		if err != nil {
			b.Fatal(err)
		}
		if rec.Consistency != snapshot.Quiesced {
			b.Fatalf("snapshot %d: %s (%s)", i, rec.Consistency, rec.Why)
		}
		frozen = append(frozen, rec.Frozen)
		freeze = append(freeze, rec.Window.Freeze)
		snap = append(snap, rec.Window.Snapshot)
		verify = append(verify, rec.Window.Verify)
		thaw = append(thaw, rec.Window.Thaw)
		b.StopTimer()
		if err := p.DeleteInstanceSnapshot(ctx, g.name, name); err != nil {
			b.Fatal(err)
		}
		// Let the guest write between snapshots, as it would.
		time.Sleep(200 * time.Millisecond)
		b.StartTimer()
	}
	b.StopTimer()
	b.ReportMetric(ms(percentile(latency, 50)), "mkdir-p50-ms")
	b.ReportMetric(ms(percentile(latency, 95)), "mkdir-p95-ms")
	b.ReportMetric(ms(percentile(frozen, 50)), "frozen-p50-ms")
	b.ReportMetric(ms(percentile(frozen, 95)), "frozen-p95-ms")
	b.Logf("n=%d frozen window p50 %v = freeze %v + snapshot %v + verify %v + thaw %v (p50 each)",
		len(frozen), percentile(frozen, 50), percentile(freeze, 50), percentile(snap, 50), percentile(verify, 50), percentile(thaw, 50))
}

// percentile returns the p-th percentile of ds (nearest rank).
func percentile(ds []time.Duration, p int) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	i := (len(s)*p + 99) / 100
	return s[max(0, min(len(s)-1, i-1))]
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
