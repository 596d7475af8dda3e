package snapshot_test

import (
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"snapfs/internal/qemutest"
	"snapfs/snapshot"
	"snapfs/snapshot/backendtest"
)

// TestConformance runs the backend conformance suite against the local
// store, one fresh store in a temp dir per subtest, with qemu-io writing
// into the head files as a VM would and qemu-img as the oracle.
func TestConformance(t *testing.T) {
	t.Parallel()
	backendtest.Run(t, backendtest.Harness{
		New: func(t *testing.T) snapshot.Backend {
			s, err := snapshot.OpenLocal(t.TempDir())
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { s.Close() })
			return s
		},
		Write: func(t *testing.T, b snapshot.Backend, volume string, off int64, data []byte) {
			t.Helper()
			src := filepath.Join(t.TempDir(), "data")
			if err := os.WriteFile(src, data, 0o600); err != nil {
				t.Fatal(err)
			}
			qemutest.IO(t, path(t, b, volume, ""), "write -s "+src+" "+strconv.FormatInt(off, 10)+" "+strconv.Itoa(len(data)))
		},
		CreateInstance: func(t *testing.T, b snapshot.Backend, name string, disks []snapshot.Disk) {
			t.Helper()
			if _, err := b.(*snapshot.LocalStore).CreateInstance(t.Context(), name, disks); err != nil {
				t.Fatal(err)
			}
		},
		Reference: func(t *testing.T, b snapshot.Backend, volume, snap string) []byte {
			t.Helper()
			return qemutest.ConvertRaw(t, path(t, b, volume, snap))
		},
	})
}

// path returns the qcow2 file whose backing chain is snapshot snap of
// volume ("" for the head).
func path(t *testing.T, b snapshot.Backend, volume, snap string) string {
	t.Helper()
	ctx := t.Context()
	if snap == "" {
		v, err := b.Volume(ctx, volume)
		if err != nil {
			t.Fatal(err)
		}
		return v.HeadPath
	}
	s, err := b.Snapshot(ctx, volume, snap)
	if err != nil {
		t.Fatal(err)
	}
	return s.Path
}
