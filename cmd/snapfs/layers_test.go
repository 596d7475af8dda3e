package main

import (
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"
)

// layers says which project packages each package may import (outside its
// tests): dependencies point one way, cmd -> fs -> snapshot -> {qcow,
// rbdio}, and qcow imports no project package. A pattern ending in "/..."
// covers the package and everything under it. This test is the project's
// depguard: a package that is in no row fails it until it is placed.
var layers = []struct {
	pkg     string
	imports []string
}{
	{"snapfs/qcow", nil},
	// The cgo backends implement the model's interfaces (snapshot.Backend,
	// snapshot.InstanceProvider), and only cmd wires them in, so that
	// snapshot and fs build without cgo.
	{"snapfs/rbdio/...", []string{"snapfs/qcow", "snapfs/snapshot", "snapfs/rbdio/..."}},
	{"snapfs/virt/...", []string{"snapfs/qcow", "snapfs/snapshot", "snapfs/virt/..."}},
	// The backend conformance suite: a test helper that the backends'
	// tests run, so it may use the qemu-img oracles.
	{"snapfs/snapshot/backendtest", []string{"snapfs/qcow", "snapfs/snapshot", "snapfs/internal/qemutest"}},
	// The model counts things in its messages ("1 open file") as the CLI
	// does, with internal/units, which imports nothing of snapfs. The
	// store's copies of imported images and the mount's staging files are
	// written with internal/directio, which imports nothing of snapfs
	// either.
	{"snapfs/snapshot/...", []string{"snapfs/qcow", "snapfs/snapshot/...", "snapfs/internal/units", "snapfs/internal/directio"}},
	{"snapfs/fs/...", []string{"snapfs/qcow", "snapfs/snapshot/...", "snapfs/fs/...", "snapfs/internal/directio"}},
	{"snapfs/cmd/...", []string{"snapfs/..."}},
	// Test helpers and the benchmark harness import nothing of snapfs: the
	// harness measures the binary, from outside. They share with the CLI
	// only how quantities are written for people.
	{"snapfs/internal/qemutest", nil},
	{"snapfs/internal/units", nil},
	{"snapfs/internal/directio", nil},
	{"snapfs/bench/...", []string{"snapfs/bench/internal/...", "snapfs/internal/units"}},
}

// matches reports whether pkg is covered by pattern.
func matches(pattern, pkg string) bool {
	if base, ok := strings.CutSuffix(pattern, "/..."); ok {
		return pkg == base || strings.HasPrefix(pkg, base+"/")
	}
	return pkg == pattern
}

// goList runs `go list` with the given arguments in the module root.
func goList(t *testing.T, env []string, args ...string) string {
	t.Helper()
	cmd := exec.Command("go", append([]string{"list"}, args...)...)
	cmd.Dir = "../.."
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("go list %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

func TestLayers(t *testing.T) {
	out := goList(t, nil, "-f", "{{.ImportPath}}{{range .Imports}} {{.}}{{end}}", "./...")
	for _, problem := range layerViolations(strings.Split(strings.TrimSpace(out), "\n")) {
		t.Error(problem)
	}
}

// TestLayersCatch checks that the layer check fails where it should.
func TestLayersCatch(t *testing.T) {
	for _, tc := range []struct {
		line string
		bad  bool
	}{
		{"snapfs/qcow fmt github.com/klauspost/compress/zstd", false},
		{"snapfs/qcow snapfs/snapshot", true},
		{"snapfs/snapshot snapfs/qcow snapfs/rbdio", true}, // rbdio is cgo: only cmd wires it in,
		{"snapfs/snapshot snapfs/fs", true},
		{"snapfs/fs snapfs/snapshot snapfs/qcow", false},
		{"snapfs/fs snapfs/cmd/snapfs", true},
		{"snapfs/fs snapfs/internal/qemutest", true},
		{"snapfs/cmd/snapfs snapfs/fs snapfs/qcow snapfs/snapshot", false},
		{"snapfs/newthing fmt", true},
	} {
		if got := layerViolations([]string{tc.line}); (len(got) > 0) != tc.bad {
			t.Errorf("%q: violations %q, want bad=%v", tc.line, got, tc.bad)
		}
	}
}

// layerViolations checks lines of "PKG IMPORT..." against the layers table.
func layerViolations(lines []string) []string {
	var problems []string
	for _, line := range lines {
		fields := strings.Fields(line)
		pkg := fields[0]
		row := -1
		for i, l := range layers {
			if matches(l.pkg, pkg) {
				row = i
				break
			}
		}
		if row < 0 {
			problems = append(problems, "package "+pkg+" is in no layer: add it to the layers table in cmd/snapfs/layers_test.go")
			continue
		}
		for _, imp := range fields[1:] {
			if !strings.HasPrefix(imp, "snapfs/") {
				continue
			}
			if imp == "snapfs/internal/qemutest" && !slices.Contains(layers[row].imports, imp) {
				problems = append(problems, pkg+" imports "+imp+" outside its tests")
				continue
			}
			ok := false
			for _, allowed := range layers[row].imports {
				ok = ok || matches(allowed, imp)
			}
			if !ok {
				problems = append(problems, pkg+" imports "+imp+": dependencies point cmd -> fs -> snapshot -> qcow, and the cgo backends (rbdio, virt) sit beside fs, wired in by cmd")
			}
		}
	}
	return problems
}

// TestPureGo checks that the engine, the model and the FUSE adapter build
// without cgo, so that they build and test anywhere; cgo stays in the
// backends (Ceph, libvirt) that need it.
func TestPureGo(t *testing.T) {
	out := goList(t, []string{"CGO_ENABLED=0"}, "-e", "-f", "{{.ImportPath}} {{if .Error}}{{.Error}}{{end}}{{range .DepsErrors}}{{.}}{{end}}",
		"-deps", "./qcow", "./snapshot", "./fs")
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		if pkg, problem, _ := strings.Cut(line, " "); problem != "" {
			t.Errorf("%s does not build with CGO_ENABLED=0: %s", pkg, problem)
		}
	}
	// go list leaves out files that need cgo rather than failing on them:
	// a package that needs cgo shows up as one with cgo files.
	cgo := goList(t, nil, "-deps", "-f", "{{if .CgoFiles}}{{if not .Standard}}{{.ImportPath}}{{end}}{{end}}", "./qcow", "./snapshot", "./fs")
	if s := strings.TrimSpace(cgo); s != "" {
		t.Errorf("packages that need cgo under qcow, snapshot or fs: %s", s)
	}
}
