package fs

import (
	"path/filepath"
	"slices"
	"testing"

	"snapfs/internal/qemutest"
)

// TestImportAgainAfterDelete: import/NAME stays a minute after its import,
// but once volumes/NAME is deleted (snapfs volume delete, which works on
// the store beside the mount) the name is free again: a second cp to
// import/NAME imports the new image instead of failing with EEXIST.
func TestImportAgainAfterDelete(t *testing.T) {
	staging := t.TempDir()
	store := newStore(t)
	m := testMount(t, store, stagingIn(staging))
	dir := t.TempDir()
	first := qemutest.Create(t, "qcow2", filepath.Join(dir, "first.qcow2"), "4M")
	qemutest.IO(t, first, "write -P 0x61 0 1M")
	second := qemutest.Create(t, "qcow2", filepath.Join(dir, "second.qcow2"), "8M")
	qemutest.IO(t, second, "write -P 0x62 1M 1M")

	if out, err := run("cp", first, m.path("import", "web")); err != nil {
		t.Fatalf("cp: %v: %s", err, out)
	}
	checkImported(t, m, "web", first)
	if err := store.DeleteVolume(t.Context(), "web"); err != nil {
		t.Fatal(err)
	}
	if got := readDir(t, m.path("import")); len(got) != 0 {
		t.Errorf("import/ after volumes/web was deleted: %v", got)
	}
	if out, err := run("cp", second, m.path("import", "web")); err != nil {
		t.Fatalf("cp after the volume was deleted: %v: %s", err, out)
	}
	checkImported(t, m, "web", second)
	// Imported again, the name is taken again, and import/web shows.
	if got := readDir(t, m.path("import")); !slices.Equal(got, []string{"web"}) {
		t.Errorf("import/ after the second import: %v", got)
	}
	noLeftovers(t, m, staging, "web")
}
