package fs

import (
	"bufio"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
)

// holdInQemu keeps image open in qemu-io, as a VM running off a volume's
// head does, until the test ends. It returns once qemu-io has opened the
// image: qemu-io opens it before it reads its first command, so the
// answer to "info" proves it.
func holdInQemu(t *testing.T, image string) {
	t.Helper()
	cmd := exec.Command("qemu-io", "-f", "qcow2", image)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("qemu-io: %v", err)
	}
	t.Cleanup(func() {
		stdin.Close() // qemu-io quits at the end of its input
		cmd.Wait()
	})
	if _, err := stdin.Write([]byte("info\n")); err != nil {
		t.Fatal(err)
	}
	if _, err := bufio.NewReader(stdout).ReadString('\n'); err != nil {
		t.Fatalf("qemu-io did not answer: %v", err)
	}
}

// TestMkdirBusyLogged: mkdir of a snapshot while qemu has the volume's
// head open (a VM runs off it) gets EBUSY, and, since mkdir can only say
// EBUSY, the log says why and what to do, for a volume's snapshot and for
// an instance's.
func TestMkdirBusyLogged(t *testing.T) {
	store := newStore(t)
	v := newVolume(t, store, "v", 4<<20, "write -P 0x0a 0 1M")
	if _, err := store.CreateInstance(t.Context(), "vm", []diskT{{Device: "vda", Volume: "v"}}); err != nil {
		t.Fatal(err)
	}
	m := testMount(t, store)
	holdInQemu(t, v.HeadPath)
	for _, dir := range []string{"volumes/v/snapshots", "instances/vm/snapshots"} {
		mustFail(t, "mkdir "+dir+"/s1 while qemu has the head open", os.Mkdir(m.path(dir, "s1"), 0o755), syscall.EBUSY)
	}
	logged := lines(m.log.String(), "snapshots/s1: ")
	if len(logged) != 2 || !strings.Contains(logged[0], "open in qemu") || !strings.Contains(logged[1], "open in qemu") {
		t.Fatalf("the log does not say why mkdir failed: %q\n%s", logged, m.log.String())
	}
	if got := readDir(t, m.path("volumes/v/snapshots")); len(got) != 0 {
		t.Errorf("volumes/v/snapshots after the refused mkdir: %v", got)
	}
}
