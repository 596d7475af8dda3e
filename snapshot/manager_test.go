package snapshot

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestInstances(t *testing.T) {
	ctx := context.Background()
	s := openStore(t)
	mustVolume(t, s, "root", 2<<20)
	mustVolume(t, s, "data", 1<<20)
	writeHead(t, s, "root", "write -P 1 0 64k")
	writeHead(t, s, "data", "write -P 2 0 64k")
	disks := []Disk{{Device: "vda", Volume: "root"}, {Device: "vdb", Volume: "data"}}

	for _, c := range []struct {
		disks []Disk
		want  error
	}{
		{nil, ErrInvalid},
		{[]Disk{{Device: "vda", Volume: "missing"}}, ErrNotFound},
		{[]Disk{{Device: "vda", Volume: "root"}, {Device: "vda", Volume: "data"}}, ErrInvalid},
		{[]Disk{{Device: "vda", Volume: "root"}, {Device: "vdb", Volume: "root"}}, ErrInvalid},
	} {
		if _, err := s.CreateInstance(ctx, "bad", c.disks); !errors.Is(err, c.want) {
			t.Errorf("CreateInstance(%v): %v, want %v", c.disks, err, c.want)
		}
	}
	in, err := s.CreateInstance(ctx, "vm1", disks)
	if err != nil {
		t.Fatal(err)
	}
	if in.Running || !slices.Equal(in.Disks, disks) || in.Created.IsZero() {
		t.Errorf("instance %+v", in)
	}
	if _, err := s.CreateInstance(ctx, "vm1", disks); !errors.Is(err, ErrExists) {
		t.Errorf("existing instance: %v", err)
	}
	if list, err := s.ListInstances(ctx); err != nil || len(list) != 1 || list[0].Name != "vm1" {
		t.Errorf("ListInstances: %v %v", list, err)
	}

	m := NewManager(s, s)
	isnap, err := m.SnapshotInstance(ctx, "vm1", "s1", map[string]string{"why": "test"})
	if err != nil {
		t.Fatal(err)
	}
	if isnap.Consistency != CrashConsistent || isnap.Frozen != 0 || isnap.Metadata["why"] != "test" ||
		!slices.Equal(isnap.Disks, []SnapshotDisk{{"vda", "root", "s1"}, {"vdb", "data", "s1"}}) {
		t.Errorf("instance snapshot %+v", isnap)
	}
	// One instant: every disk snapshot has the record's creation time.
	for _, d := range isnap.Disks {
		snap, err := s.Snapshot(ctx, d.Volume, d.Snapshot)
		if err != nil {
			t.Fatal(err)
		}
		if snap.Instance != "vm1" || !snap.Created.Equal(isnap.Created) || snap.Consistency != CrashConsistent {
			t.Errorf("disk snapshot %+v", snap)
		}
	}
	rootS1 := capture(t, s, "root")["s1"]
	if _, err := m.SnapshotInstance(ctx, "vm1", "s1", nil); !errors.Is(err, ErrExists) {
		t.Errorf("instance snapshot twice: %v", err)
	}
	if _, err := m.SnapshotInstance(ctx, "nope", "s1", nil); !errors.Is(err, ErrNotFound) {
		t.Errorf("snapshot of a missing instance: %v", err)
	}
	// A volume that already has the name refuses the whole instance
	// snapshot, and none of its disks gets one.
	mustSnapshot(t, s, "data", "s2")
	if _, err := m.SnapshotInstance(ctx, "vm1", "s2", nil); !errors.Is(err, ErrExists) {
		t.Errorf("instance snapshot over an existing disk snapshot: %v", err)
	}
	if _, err := s.Snapshot(ctx, "root", "s2"); !errors.Is(err, ErrNotFound) {
		t.Errorf("half an instance snapshot: %v", err)
	}

	// What depends on the instance snapshot is protected.
	if err := s.DeleteSnapshot(ctx, "root", "s1"); !errors.Is(err, ErrBusy) {
		t.Errorf("delete of an instance's disk snapshot: %v", err)
	}
	if err := s.DeleteVolume(ctx, "data"); !errors.Is(err, ErrBusy) {
		t.Errorf("delete of an instance's volume: %v", err)
	}
	if err := s.DeleteInstance(ctx, "vm1"); !errors.Is(err, ErrBusy) || !strings.Contains(err.Error(), "has 1 snapshot;") {
		t.Errorf("delete of an instance with a snapshot: %v", err)
	}
	release, err := m.Hold(ctx, "root", "s1")
	if err != nil {
		t.Fatal(err)
	}
	if err := m.DeleteInstanceSnapshot(ctx, "vm1", "s1"); !errors.Is(err, ErrBusy) || !strings.HasSuffix(err.Error(), "has 1 open file") {
		t.Errorf("delete of an instance snapshot with an open file: %v", err)
	}
	img, err := s.OpenSnapshot(ctx, "root", "s1")
	if err != nil {
		t.Fatal(err)
	}
	release()
	release() // twice is harmless
	if err := m.DeleteInstanceSnapshot(ctx, "vm1", "s1"); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(readImage(t, img), rootS1) {
		t.Error("an image opened before the delete reads differently")
	}
	if _, err := s.Snapshot(ctx, "root", "s1"); !errors.Is(err, ErrNotFound) {
		t.Errorf("disk snapshot left: %v", err)
	}
	if snaps, err := s.ListInstanceSnapshots(ctx, "vm1"); err != nil || len(snaps) != 0 {
		t.Errorf("instance snapshots left: %v %v", snaps, err)
	}
	if err := s.DeleteInstance(ctx, "vm1"); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteVolume(ctx, "data"); err != nil {
		t.Fatal(err)
	}
	checkNoStrayFiles(t, s)
}

// runningProvider plays a running instance of the local store with a
// guest agent, as libvirt will: Freeze and thaw are recorded, and can be
// made to fail or to hang.
type runningProvider struct {
	*LocalStore
	freezeErr error
	thawErr   error
	// block makes CreateInstanceSnapshot wait for its context.
	block bool

	mu     sync.Mutex
	frozen bool
	thaws  int
}

func (p *runningProvider) Instance(ctx context.Context, name string) (Instance, error) {
	in, err := p.LocalStore.Instance(ctx, name)
	in.Running = true
	return in, err
}

func (p *runningProvider) Freeze(ctx context.Context, name string) (func(context.Context) error, error) {
	if p.freezeErr != nil {
		return nil, p.freezeErr
	}
	p.mu.Lock()
	p.frozen = true
	p.mu.Unlock()
	return func(context.Context) error {
		p.mu.Lock()
		defer p.mu.Unlock()
		p.frozen = false
		p.thaws++
		return p.thawErr
	}, nil
}

func (p *runningProvider) CreateInstanceSnapshot(ctx context.Context, instance, name string, opts InstanceSnapshotOptions) (InstanceSnapshot, error) {
	p.mu.Lock()
	frozen := p.frozen
	p.mu.Unlock()
	if opts.Consistency == Quiesced && !frozen {
		return InstanceSnapshot{}, errors.New("asked to record quiesced, but the guest is not frozen")
	}
	if p.block {
		<-ctx.Done()
		return InstanceSnapshot{}, ctx.Err()
	}
	time.Sleep(time.Millisecond) // a frozen window long enough to measure
	return p.LocalStore.CreateInstanceSnapshot(ctx, instance, name, opts)
}

func TestSnapshotRunningInstance(t *testing.T) {
	ctx := context.Background()
	s := openStore(t)
	mustVolume(t, s, "root", 1<<20)
	if _, err := s.CreateInstance(ctx, "vm", []Disk{{Device: "vda", Volume: "root"}}); err != nil {
		t.Fatal(err)
	}
	n := 0
	next := func() string { n++; return fmt.Sprintf("s%d", n) }

	// Frozen, snapshotted, thawed: quiesced, with the window recorded.
	p := &runningProvider{LocalStore: s}
	m := NewManager(s, p)
	snap, err := m.SnapshotInstance(ctx, "vm", next(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if snap.Consistency != Quiesced || snap.Frozen <= 0 || p.thaws != 1 || p.frozen {
		t.Errorf("snapshot %+v, thaws %d, frozen %v", snap, p.thaws, p.frozen)
	}

	// The snapshot fails: thawed all the same.
	p = &runningProvider{LocalStore: s}
	m = NewManager(s, p)
	if _, err := m.SnapshotInstance(ctx, "vm", "s1", nil); !errors.Is(err, ErrExists) || p.thaws != 1 {
		t.Errorf("failed snapshot: %v, thaws %d", err, p.thaws)
	}

	// The snapshot hangs: abandoned after FreezeTimeout, thawed; and a
	// caller that gives up gets the same.
	p = &runningProvider{LocalStore: s, block: true}
	m = NewManager(s, p)
	m.FreezeTimeout = 50 * time.Millisecond
	start := time.Now()
	if _, err := m.SnapshotInstance(ctx, "vm", next(), nil); !errors.Is(err, context.DeadlineExceeded) || p.thaws != 1 || p.frozen {
		t.Errorf("hung snapshot: %v, thaws %d", err, p.thaws)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("the guest stayed frozen %v", d)
	}
	cctx, cancel := context.WithCancel(ctx)
	m.FreezeTimeout = time.Hour
	time.AfterFunc(20*time.Millisecond, cancel)
	if _, err := m.SnapshotInstance(cctx, "vm", next(), nil); !errors.Is(err, context.Canceled) || p.thaws != 2 {
		t.Errorf("cancelled snapshot: %v, thaws %d", err, p.thaws)
	}

	// The thaw fails: the snapshot exists, and the error says so.
	p = &runningProvider{LocalStore: s, thawErr: errors.New("agent gone")}
	m = NewManager(s, p)
	name := next()
	if snap, err := m.SnapshotInstance(ctx, "vm", name, nil); err == nil || snap.Name != name {
		t.Errorf("failed thaw: %+v, %v", snap, err)
	}

	// No agent: crash-consistent fallback, or a refusal when quiesce is
	// required.
	p = &runningProvider{LocalStore: s, freezeErr: fmt.Errorf("%w: no guest agent", ErrUnsupported)}
	m = NewManager(s, p)
	if snap, err := m.SnapshotInstance(ctx, "vm", next(), nil); err != nil || snap.Consistency != CrashConsistent {
		t.Errorf("fallback: %+v, %v", snap, err)
	}
	m.RequireQuiesce = true
	name = next()
	if _, err := m.SnapshotInstance(ctx, "vm", name, nil); !errors.Is(err, ErrUnsupported) {
		t.Errorf("required quiesce: %v", err)
	}
	if _, err := s.InstanceSnapshot(ctx, "vm", name); !errors.Is(err, ErrNotFound) {
		t.Errorf("refused snapshot exists: %v", err)
	}
}

// TestConcurrentReaders: readers read snapshots and the head while
// snapshots are created and deleted (merged) around them, and every byte
// read equals the reference.
func TestConcurrentReaders(t *testing.T) {
	ctx := context.Background()
	s := openStore(t)
	buildChain(t, s, "vm")
	ref := capture(t, s, "vm")
	other := reopen(t, s.dir) // a second process's view, too

	stop := make(chan struct{})
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for r := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			store := s
			if r%2 == 1 {
				store = other
			}
			names := []string{"s1", "s3", ""}
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				name := names[(i+r)%len(names)]
				var img interface {
					ReadAt([]byte, int64) (int, error)
					Close() error
					Size() int64
				}
				var err error
				if name == "" {
					img, err = store.OpenHead(ctx, "vm")
				} else {
					img, err = store.OpenSnapshot(ctx, "vm", name)
				}
				if err != nil {
					errs <- fmt.Errorf("open %q: %w", name, err)
					return
				}
				buf := make([]byte, img.Size())
				_, err = img.ReadAt(buf, 0)
				img.Close()
				if err != nil {
					errs <- fmt.Errorf("read %q: %w", name, err)
					return
				}
				if !bytes.Equal(buf, ref[name]) {
					errs <- fmt.Errorf("snapshot %q read differently", name)
					return
				}
			}
		}()
	}
	// The mutator: take and delete snapshots, merging into s3 and the
	// head over and over, from both stores.
	for i := range 12 {
		store := []*LocalStore{s, other}[i%2]
		name := fmt.Sprintf("t%d", i)
		if _, err := store.CreateSnapshots(ctx, []string{"vm"}, name, SnapshotOptions{}); err != nil {
			t.Fatal(err)
		}
		if i > 0 {
			if err := store.DeleteSnapshot(ctx, "vm", fmt.Sprintf("t%d", i-1)); err != nil {
				t.Fatal(err)
			}
		}
		switch i {
		case 3:
			err := store.DeleteSnapshot(ctx, "vm", "s2")
			if err != nil {
				t.Fatal(err)
			}
		case 7:
			if err := store.DeleteSnapshot(ctx, "vm", "s4"); err != nil {
				t.Fatal(err)
			}
		}
	}
	close(stop)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	got := capture(t, s, "vm")
	for _, name := range []string{"s1", "s3", ""} {
		if !bytes.Equal(got[name], ref[name]) {
			t.Errorf("%q differs at the end", name)
		}
	}
	checkNoStrayFiles(t, s)
}
