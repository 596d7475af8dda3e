package main

import (
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// TestReadmeListsCommands: the README's command line section lists every
// subcommand of the store commands, as --help of the binary does, and no
// other.
func TestReadmeListsCommands(t *testing.T) {
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	for _, group := range []string{"volume", "snapshot", "instance"} {
		var inReadme []string
		for _, m := range regexp.MustCompile(`(?m)^snapfs `+group+` ([a-z-]+)`).FindAllStringSubmatch(string(readme), -1) {
			inReadme = append(inReadme, m[1])
		}
		var inHelp []string
		_, commands, _ := strings.Cut(mustSucceed(t, group, "--help"), "Available Commands:\n")
		for _, line := range strings.Split(commands, "\n") {
			if !strings.HasPrefix(line, "  ") {
				break
			}
			inHelp = append(inHelp, strings.Fields(line)[0])
		}
		// A command may show again in another section (the libvirt one).
		slices.Sort(inReadme)
		inReadme = slices.Compact(inReadme)
		slices.Sort(inHelp)
		if len(inHelp) == 0 || !slices.Equal(inReadme, inHelp) {
			t.Errorf("README lists snapfs %s %q; --help lists %q", group, inReadme, inHelp)
		}
	}
}
