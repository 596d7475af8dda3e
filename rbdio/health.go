//go:build ceph && cgo

package rbdio

import (
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
)

// blockingChecks are the health checks under which the OSDs hold writes
// back (rather than fail them) until space is freed: a write then ends in
// ErrTimeout, which alone reads as a dead cluster.
var blockingChecks = []string{"OSD_FULL", "POOL_FULL"}

// explainTimeout adds to err, a write that timed out, what the cluster's
// health says about space, if it says the cluster or a pool is full.
// Other errors pass unchanged.
func (c *Cluster) explainTimeout(err error) error {
	if !errors.Is(err, ErrTimeout) {
		return err
	}
	if full := c.fullChecks(); full != "" {
		return fmt.Errorf("%w (the cluster is full: %s; writes wait until space is freed or the quota is raised)", err, full)
	}
	return err
}

// fullChecks returns the messages of the health checks that hold writes
// back, or "" if none is raised (or the health cannot be read).
func (c *Cluster) fullChecks() string {
	out, _, err := c.conn.MonCommand([]byte(`{"prefix": "health", "format": "json"}`))
	if err != nil {
		return ""
	}
	var health struct {
		Checks map[string]struct {
			Summary struct {
				Message string `json:"message"`
			} `json:"summary"`
		} `json:"checks"`
	}
	if json.Unmarshal(out, &health) != nil {
		return ""
	}
	var msgs []string
	for name, check := range health.Checks {
		if slices.Contains(blockingChecks, name) {
			msgs = append(msgs, check.Summary.Message)
		}
	}
	slices.Sort(msgs)
	return strings.Join(msgs, "; ")
}
