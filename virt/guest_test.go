//go:build libvirt && cgo

package virt

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"libvirt.org/go/libvirt"

	"snapfs/qcow"
	"snapfs/virt/virttest"
)

// guest is a tiny test VM (scripts/libvirt/build-guest.sh): no root disk,
// ext4 data disks it writes to continuously, a serial console in a file
// that shows a heartbeat line ("HB N") per write round, and qemu-ga.
type guest struct {
	t       testing.TB
	name    string
	dir     string            // its files: disks, console log
	disks   map[string]string // device -> initial disk file
	console string
	conn    *libvirt.Connect
	dom     *libvirt.Domain
}

// newGuest defines (persistent) and starts a guest with ndisks ext4 data
// disks of 64 MiB (vdb, vdc, ...) and waits until its agent answers. The
// domain is destroyed and undefined at the end of the test. cmdline adds
// to the kernel command line (snapfs.freeze_hook: see build-guest.sh).
func newGuest(t testing.TB, ndisks int, cmdline ...string) *guest {
	t.Helper()
	dir := t.TempDir()
	var disks []virttest.Disk
	for i := range ndisks {
		dev := fmt.Sprintf("vd%c", 'b'+i)
		disks = append(disks, virttest.Disk{Device: dev, File: ext4Image(t, dir, dev)})
	}
	return newGuestOn(t, dir, disks, cmdline...)
}

// ext4Image makes an empty ext4 filesystem of 64 MiB labelled dev, as a
// qcow2 file in dir, and returns its path.
func ext4Image(t testing.TB, dir, dev string) string {
	t.Helper()
	raw := filepath.Join(dir, dev+".raw")
	img := filepath.Join(dir, dev+".qcow2")
	run(t, "truncate", "-s", "64M", raw)
	run(t, "mkfs.ext4", "-q", "-F", "-L", dev, raw)
	run(t, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, img)
	os.Remove(raw)
	return img
}

// newGuestOn is newGuest on given qcow2 disks (ext4 filesystems labelled
// with their device names), with its console in dir.
func newGuestOn(t testing.TB, dir string, disks []virttest.Disk, cmdline ...string) *guest {
	t.Helper()
	conn, err := libvirt.NewConnect(testURI)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	g := &guest{t: t, dir: dir, disks: map[string]string{}, conn: conn}
	g.name = fmt.Sprintf("snapfs-%s-%d", strings.NewReplacer("/", "-", "_", "-").Replace(t.Name()), time.Now().UnixNano()%100000)
	g.console = filepath.Join(g.dir, "console.log")
	for _, d := range disks {
		g.disks[d.Device] = d.File
	}
	doc := virttest.DomainXML(g.name, guestDir, g.console, disks, cmdline...)
	g.dom, err = conn.DomainDefineXML(doc)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if active, _ := g.dom.IsActive(); active {
			g.dom.Destroy()
		}
		g.dom.Undefine()
		g.dom.Free()
		if t.Failed() {
			if b, err := os.ReadFile(g.console); err == nil {
				lines := strings.Split(strings.TrimSpace(string(b)), "\n")
				t.Logf("last console lines of %s:\n%s", g.name, strings.Join(lines[max(0, len(lines)-15):], "\n"))
			}
		}
	})
	g.start()
	return g
}

// start boots the guest and waits for its agent and its first heartbeats.
func (g *guest) start() {
	g.t.Helper()
	t0 := time.Now()
	if err := g.dom.Create(); err != nil {
		g.t.Fatal(err)
	}
	g.waitAgent(3 * time.Minute)
	g.t.Logf("guest %s: agent ready %.1f s after start", g.name, time.Since(t0).Seconds())
	g.waitHeartbeats(2, time.Minute)
}

// waitAgent polls guest-ping until the agent answers.
func (g *guest) waitAgent(timeout time.Duration) {
	g.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		_, err := g.dom.QemuAgentCommand(`{"execute":"guest-ping"}`, 2, 0)
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			g.t.Fatalf("guest %s: agent not ready after %v: %v", g.name, timeout, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// heartbeats counts the heartbeat lines on the console so far.
func (g *guest) heartbeats() int {
	b, err := os.ReadFile(g.console)
	if err != nil {
		return 0
	}
	n := 0
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "HB ") {
			n++
		}
	}
	return n
}

// waitHeartbeats waits for n more heartbeat lines: the guest writes to
// its disks, so its filesystems are not frozen.
func (g *guest) waitHeartbeats(n int, timeout time.Duration) {
	g.t.Helper()
	start := g.heartbeats()
	deadline := time.Now().Add(timeout)
	for g.heartbeats() < start+n {
		if time.Now().After(deadline) {
			g.t.Fatalf("guest %s: %d heartbeats in %v, want %d more: its disks do not take writes (frozen?)",
				g.name, g.heartbeats()-start, timeout, n)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// consoleHas says whether the console shows a line containing s.
func (g *guest) consoleHas(s string) bool {
	b, _ := os.ReadFile(g.console)
	return strings.Contains(string(b), s)
}

// freezeStatus asks the agent for guest-fsfreeze-status, retrying while it
// is away (restarting).
func (g *guest) freezeStatus(timeout time.Duration) string {
	g.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		out, err := g.dom.QemuAgentCommand(`{"execute":"guest-fsfreeze-status"}`, 2, 0)
		if err == nil {
			var r struct{ Return string }
			if err := json.Unmarshal([]byte(out), &r); err != nil {
				g.t.Fatal(err)
			}
			return r.Return
		}
		if time.Now().After(deadline) {
			g.t.Fatalf("guest %s: fsfreeze-status: %v", g.name, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// exec starts a shell command in the guest through the agent and returns
// at once (guest-exec); the command's output goes to /dev/ttyS0 if it
// writes there.
func (g *guest) exec(script string) {
	g.t.Helper()
	arg, _ := json.Marshal(map[string]any{"execute": "guest-exec", "arguments": map[string]any{
		"path": "/bin/sh", "arg": []string{"-c", script}}})
	if _, err := g.dom.QemuAgentCommand(string(arg), 5, 0); err != nil {
		g.t.Fatalf("guest-exec: %v", err)
	}
}

// execOutput runs a shell command in the guest and returns its stdout.
func (g *guest) execOutput(script string) string {
	g.t.Helper()
	arg, _ := json.Marshal(map[string]any{"execute": "guest-exec", "arguments": map[string]any{
		"path": "/bin/sh", "arg": []string{"-c", script}, "capture-output": true}})
	out, err := g.dom.QemuAgentCommand(string(arg), 5, 0)
	if err != nil {
		g.t.Fatalf("guest-exec: %v", err)
	}
	var started struct{ Return struct{ PID int } }
	json.Unmarshal([]byte(out), &started)
	for range 100 {
		st, err := g.dom.QemuAgentCommand(fmt.Sprintf(`{"execute":"guest-exec-status","arguments":{"pid":%d}}`, started.Return.PID), 5, 0)
		if err != nil {
			g.t.Fatal(err)
		}
		var r struct {
			Return struct {
				Exited  bool
				OutData string `json:"out-data"`
			}
		}
		json.Unmarshal([]byte(st), &r)
		if r.Return.Exited {
			b, _ := base64.StdEncoding.DecodeString(r.Return.OutData)
			return string(b)
		}
		time.Sleep(100 * time.Millisecond)
	}
	g.t.Fatalf("guest-exec %q did not finish", script)
	return ""
}

// run runs a command and fails the test if it fails.
func run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// rawOf converts the image chain topped by file to a raw file with
// qemu-img (the oracle) and returns its path. -U: qemu holds the chain.
func rawOf(t testing.TB, file string) string {
	t.Helper()
	out := filepath.Join(t.TempDir(), filepath.Base(file)+".raw")
	run(t, "qemu-img", "convert", "-U", "-O", "raw", file, out)
	return out
}

// ext4State reports on the ext4 filesystem in a raw image: whether the
// journal needs recovery (dumpe2fs -h shows needs_recovery: the image was
// taken from a mounted, unfrozen filesystem), and whether e2fsck -fn finds
// it clean.
func ext4State(t testing.TB, raw string) (needsRecovery bool, fsckClean bool) {
	t.Helper()
	out := run(t, "dumpe2fs", "-h", raw)
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(l, "Filesystem features:") {
			needsRecovery = strings.Contains(l, "needs_recovery")
		}
	}
	err := exec.Command("e2fsck", "-fn", raw).Run()
	return needsRecovery, err == nil
}

// sha256Image hashes what an image reads, through snapfs's own reader.
func sha256Image(t testing.TB, img qcow.Image) string {
	t.Helper()
	h := sha256.New()
	if _, err := io.Copy(h, io.NewSectionReader(img, 0, img.Size())); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// sha256File hashes a file.
func sha256File(t testing.TB, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// testProvider opens a provider on the test daemon with its records in a
// temp dir. It logs with the log package: a background thaw may log after
// the test returned, when t.Logf would panic.
func testProvider(t testing.TB, cfg Config) *Provider {
	t.Helper()
	cfg.URI = testURI
	if cfg.StateDir == "" {
		cfg.StateDir = t.TempDir()
	}
	p, err := Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

// testCtx is the context of a test: bounded, so a hang is a failure.
func testCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	t.Cleanup(cancel)
	return ctx
}
