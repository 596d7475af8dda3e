package fuseproc

import "testing"

func TestUnescapeMountinfo(t *testing.T) {
	for in, want := range map[string]string{
		"/mnt/plain":          "/mnt/plain",
		`/mnt/with\040space`:  "/mnt/with space",
		`/mnt/tab\011and\134`: "/mnt/tab\tand\\",
		`/mnt/short\04`:       `/mnt/short\04`,
	} {
		if got := unescapeMountinfo(in); got != want {
			t.Errorf("unescapeMountinfo(%q) = %q, want %q", in, got, want)
		}
	}
}
