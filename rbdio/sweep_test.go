//go:build ceph && cgo

package rbdio

import (
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"
)

// TestSweepAfterWatchExpires: an importer killed in the middle (kill -9)
// and restarted at once finds its temp image still watched, because the
// OSDs keep a dead client's watch for osd_client_watch_timeout: Open
// leaves it, and the same connection removes it once the watch has
// expired, not only the next Open.
func TestSweepAfterWatchExpires(t *testing.T) {
	// A short watch timeout for the OSD and for our client, which waits
	// for it.
	cli(t, "ceph", "config", "set", "global", "osd_client_watch_timeout", "4")
	t.Cleanup(func() { cli(t, "ceph", "config", "rm", "global", "osd_client_watch_timeout") })

	orphan := tempPrefix + "fedcba9876543210"
	cli(t, "rbd", "create", "--size", "64M", "rbd/"+orphan)
	t.Cleanup(func() { exec.Command("rbd", "-c", cephConf, "rm", "--no-progress", "rbd/"+orphan).Run() })
	// The importer: a client that writes to the image until it is killed.
	importer := exec.Command("rbd", "-c", cephConf, "bench", "--io-type", "write", "--io-size", "4K",
		"--io-threads", "1", "--io-total", "64G", "rbd/"+orphan)
	if err := importer.Start(); err != nil {
		t.Fatal(err)
	}
	for !strings.Contains(string(cli(t, "rbd", "status", "rbd/"+orphan)), "watcher=") {
		if importer.ProcessState != nil {
			t.Fatal("rbd bench ended before it watched the image")
		}
		time.Sleep(100 * time.Millisecond)
	}
	importer.Process.Kill() // SIGKILL: its watch stays until it expires
	importer.Wait()

	c2, err := Open(Config{CephConf: cephConf, Pools: []string{testPool}})
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	// A bound on a hang, not on the sweep: the watch expires after 4 s.
	deadline := time.Now().Add(2 * time.Minute)
	for slices.Contains(tempImages(t), orphan) {
		if time.Now().After(deadline) {
			t.Fatalf("%s is still there two minutes after the importer died, with a connection open", orphan)
		}
		time.Sleep(500 * time.Millisecond)
	}
}
