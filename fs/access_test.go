package fs

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// TestReadOnly: on a read-only mount every change fails with EROFS, and
// reading works.
func TestReadOnly(t *testing.T) {
	store := newStore(t)
	newVolume(t, store, "v", 4<<20, "write -P 5 0 1M")
	if _, err := store.CreateSnapshots(t.Context(), []string{"v"}, "s", snapshotOptions()); err != nil {
		t.Fatal(err)
	}
	if _, err := store.CreateInstance(t.Context(), "vm", []diskT{{Device: "vda", Volume: "v"}}); err != nil {
		t.Fatal(err)
	}
	m := testMount(t, store, func(c *Config) { c.ReadOnly = true })
	snaps := m.path("volumes", "v", "snapshots")
	for what, err := range map[string]error{
		"mkdir snapshot":          os.Mkdir(filepath.Join(snaps, "new"), 0o755),
		"rmdir snapshot":          os.Remove(filepath.Join(snaps, "s")),
		"mkdir instance snapshot": os.Mkdir(m.path("instances", "vm", "snapshots", "new"), 0o755),
		"import":                  os.WriteFile(m.path("import", "new"), []byte("x"), 0o600),
		"write disk.raw":          os.WriteFile(filepath.Join(snaps, "s", "disk.raw"), []byte("x"), 0o600),
		"chmod":                   os.Chmod(filepath.Join(snaps, "s", "disk.raw"), 0o644),
		"touch":                   exec.Command("touch", filepath.Join(snaps, "s", "meta.json")).Run(),
		"mkdir volume":            os.Mkdir(m.path("volumes", "new"), 0o755),
		"symlink":                 os.Symlink("x", m.path("volumes", "new")),
	} {
		if what == "touch" {
			// touch exits 1; its errno is checked with utimes below.
			if err == nil {
				t.Errorf("touch on a read-only mount succeeded")
			}
			continue
		}
		mustFail(t, what, err, syscall.EROFS)
	}
	mustFail(t, "utimes", os.Chtimes(filepath.Join(snaps, "s", "meta.json"), timeZero, timeZero), syscall.EROFS)
	checkExports(t, m, "v", "s")
}

// TestAccess: only the mounting user reaches the mount unless it is
// mounted with AllowOther; then the modes decide, and "other" never reads.
func TestAccess(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("TestAccess runs as root (make test does): it switches to other users")
	}
	store := newStore(t)
	newVolume(t, store, "v", 1<<20, "write -P 5 0 64k")
	if _, err := store.CreateSnapshots(t.Context(), []string{"v"}, "s", snapshotOptions()); err != nil {
		t.Fatal(err)
	}
	const nobody, group = 65534, 4242
	// as runs ls (or cat) as uid:gid and returns its output and error.
	as := func(uid, gid uint32, args ...string) (string, error) {
		cmd := exec.Command(args[0], args[1:]...)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: gid}}
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	// The temp dirs above the mount point must let other users through.
	openUp := func(m *mounted) {
		for dir := filepath.Dir(m.dir); dir != "/" && strings.HasPrefix(dir, os.TempDir()+"/"); dir = filepath.Dir(dir) {
			os.Chmod(dir, 0o755)
		}
	}

	t.Run("default", func(t *testing.T) {
		// What snapfs mount does without flags.
		m := testMount(t, store, func(c *Config) { c.Umask = 0o077 })
		openUp(m)
		if out, err := as(nobody, nobody, "ls", m.dir); err == nil || !strings.Contains(out, "Permission denied") {
			t.Errorf("another user listed the mount: %v %s", err, out)
		}
		st, err := os.Stat(m.path("volumes", "v", "snapshots", "s", "disk.raw"))
		if err != nil {
			t.Fatal(err)
		}
		if perm := st.Mode().Perm(); perm != 0o400 {
			t.Errorf("disk.raw mode %v, want 0400", perm)
		}
		if sys := st.Sys().(*syscall.Stat_t); sys.Uid != uint32(os.Getuid()) {
			t.Errorf("disk.raw owner %d, want %d", sys.Uid, os.Getuid())
		}
	})

	t.Run("allow-other", func(t *testing.T) {
		m := testMount(t, store, func(c *Config) {
			c.AllowOther = true
			c.UID, c.GID = 1234, group
			c.Umask = 0o027
		})
		openUp(m)
		raw := m.path("volumes", "v", "snapshots", "s", "disk.raw")
		st, err := os.Stat(raw)
		if err != nil {
			t.Fatal(err)
		}
		sys := st.Sys().(*syscall.Stat_t)
		if st.Mode().Perm() != 0o440 || sys.Uid != 1234 || sys.Gid != group {
			t.Errorf("disk.raw: mode %v owner %d:%d; want 0440 1234:%d", st.Mode().Perm(), sys.Uid, sys.Gid, group)
		}
		// A member of the group reads; anyone else is refused.
		if out, err := as(nobody, group, "cmp", raw, raw); err != nil {
			t.Errorf("a group member could not read disk.raw: %v %s", err, out)
		}
		if out, err := as(nobody, nobody, "cat", raw); err == nil || !strings.Contains(out, "Permission denied") {
			t.Errorf("another user read disk.raw: %v %s", err, out)
		}
		if out, err := as(nobody, group, "mkdir", m.path("volumes", "v", "snapshots", "new")); err == nil {
			t.Errorf("a group member without write permission took a snapshot: %s", out)
		}
	})

	t.Run("umask cannot open to others", func(t *testing.T) {
		m := testMount(t, store, func(c *Config) { c.AllowOther = true; c.Umask = 0 })
		st, err := os.Stat(m.path("volumes", "v", "snapshots", "s", "disk.raw"))
		if err != nil {
			t.Fatal(err)
		}
		if perm := st.Mode().Perm(); perm != 0o440 {
			t.Errorf("disk.raw mode with umask 0: %v, want 0440", perm)
		}
	})
}
