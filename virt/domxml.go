package virt

// Domain XML: the few parts snapfs reads (name, uuid, disks), and an
// in-place rewrite of disk sources that leaves every other byte alone, so
// that an XML handed back to libvirt (define, restore) keeps what snapfs
// does not model.

import (
	"bytes"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"regexp"
	"slices"
	"strings"

	"snapfs/snapshot"
)

// DiskKind says what backs a disk.
type DiskKind string

// The disk kinds snapfs tells apart.
const (
	// FileDisk: a local image file (qcow2 or raw), snapshotted by libvirt
	// external snapshots.
	FileDisk DiskKind = "file"
	// RBDDisk: a Ceph RBD image (network disk, protocol rbd), snapshotted
	// through the snapshot.Backend of its pool.
	RBDDisk DiskKind = "rbd"
	// OtherDisk: anything else (a block device, another network protocol,
	// a storage pool volume): listed, not snapshotted.
	OtherDisk DiskKind = "other"
)

// Disk describes one disk of a domain.
type Disk struct {
	// Device is the target device name (vda, sdb).
	Device string   `json:"device"`
	Kind   DiskKind `json:"kind"`
	// Format is the driver type (qcow2, raw), "" when unknown.
	Format string `json:"format,omitempty"`
	// Path is the active file of a file disk (what qemu writes to).
	Path string `json:"path,omitempty"`
	// Pool and Image name an RBD disk's image.
	Pool  string `json:"pool,omitempty"`
	Image string `json:"image,omitempty"`
	// Source describes any disk in one string: the path, rbd:POOL/IMAGE,
	// or the XML type and source of another kind.
	Source string `json:"source"`
	// Volume is the snapfs volume behind the disk when there is one (a file
	// of the local store, an image of a mounted pool): see
	// Config.VolumeOf.
	Volume string `json:"volume,omitempty"`
	// Snapshot is false for the disks a snapshot leaves out: read-only and
	// shareable disks, CD-ROMs, and disks the XML marks snapshot='no'.
	Snapshot bool `json:"snapshot"`
	// Why says why Snapshot is false, or why the disk cannot be taken.
	Why string `json:"why,omitempty"`
}

// domainXML is what snapfs reads of a domain's XML.
type domainXML struct {
	XMLName xml.Name  `xml:"domain"`
	Type    string    `xml:"type,attr"`
	Name    string    `xml:"name"`
	UUID    string    `xml:"uuid"`
	Disks   []diskXML `xml:"devices>disk"`
}

type diskXML struct {
	Type     string `xml:"type,attr"`
	Device   string `xml:"device,attr"`
	Snapshot string `xml:"snapshot,attr"`
	Driver   struct {
		Type string `xml:"type,attr"`
	} `xml:"driver"`
	Source struct {
		File     string `xml:"file,attr"`
		Dev      string `xml:"dev,attr"`
		Protocol string `xml:"protocol,attr"`
		Name     string `xml:"name,attr"`
		Pool     string `xml:"pool,attr"`
		Volume   string `xml:"volume,attr"`
	} `xml:"source"`
	Target struct {
		Dev string `xml:"dev,attr"`
	} `xml:"target"`
	ReadOnly  *struct{} `xml:"readonly"`
	Shareable *struct{} `xml:"shareable"`
}

// parseDomainXML reads a domain's name, UUID and disks. Disks without a
// target device are left out (libvirt always gives one); a device name
// snapfs cannot show as a file name is refused.
func parseDomainXML(doc string) (*domainXML, []Disk, error) {
	var d domainXML
	if err := xml.Unmarshal([]byte(doc), &d); err != nil {
		return nil, nil, fmt.Errorf("%w: domain XML: %v", snapshot.ErrInvalid, err)
	}
	var disks []Disk
	seen := map[string]bool{}
	for _, x := range d.Disks {
		if x.Target.Dev == "" {
			continue
		}
		if err := snapshot.CheckDeviceName(x.Target.Dev); err != nil {
			return nil, nil, fmt.Errorf("domain %q: %w", d.Name, err)
		}
		if seen[x.Target.Dev] {
			return nil, nil, fmt.Errorf("%w: domain %q has two disks named %q", snapshot.ErrInvalid, d.Name, x.Target.Dev)
		}
		seen[x.Target.Dev] = true
		disks = append(disks, x.disk())
	}
	return &d, disks, nil
}

// disk classifies one <disk>.
func (x diskXML) disk() Disk {
	d := Disk{Device: x.Target.Dev, Format: x.Driver.Type, Snapshot: true}
	switch {
	case x.Type == "file" || (x.Type == "" && x.Source.File != ""):
		d.Kind, d.Path, d.Source = FileDisk, x.Source.File, x.Source.File
		if d.Path == "" {
			d.Snapshot, d.Why = false, "no medium"
		}
	case x.Type == "network" && x.Source.Protocol == "rbd":
		d.Kind = RBDDisk
		d.Pool, d.Image, _ = strings.Cut(x.Source.Name, "/")
		d.Source = "rbd:" + x.Source.Name
		if d.Image == "" || strings.Contains(d.Image, "@") {
			d.Snapshot, d.Why = false, "RBD source "+x.Source.Name+" is not POOL/IMAGE"
		}
	default:
		d.Kind = OtherDisk
		switch x.Type {
		case "block":
			d.Source = "block:" + x.Source.Dev
		case "network":
			d.Source = x.Source.Protocol + ":" + x.Source.Name
		case "volume":
			d.Source = "volume:" + x.Source.Pool + "/" + x.Source.Volume
		default:
			d.Source = x.Type + ":"
		}
		d.Snapshot, d.Why = false, "a "+x.Type+" disk cannot be snapshotted by snapfs"
	}
	switch {
	case x.Device != "" && x.Device != "disk":
		d.Snapshot, d.Why = false, "a "+x.Device+", not a disk"
	case x.ReadOnly != nil:
		d.Snapshot, d.Why = false, "read-only"
	case x.Shareable != nil:
		d.Snapshot, d.Why = false, "shareable between domains"
	case x.Snapshot == "no":
		d.Snapshot, d.Why = false, "the domain XML says snapshot='no'"
	}
	return d
}

// fileAttr matches the file attribute in the text of one start tag.
var fileAttr = regexp.MustCompile(`\sfile=("[^"]*"|'[^']*')`)

// typeAttr matches the type attribute in the text of one start tag.
var typeAttr = regexp.MustCompile(`\stype=("[^"]*"|'[^']*')`)

// insertAttr adds name=value to the start tag tag (a whole "<x ...>" or
// "<x .../>").
func insertAttr(tag, name, value string) string {
	end := len(tag) - 1
	if strings.HasSuffix(tag, "/>") {
		end--
	}
	return tag[:end] + " " + name + "=" + quoteAttr(value) + tag[end:]
}

// indexAttr matches the index attribute libvirt adds to live sources.
var indexAttr = regexp.MustCompile(`\sindex=("[^"]*"|'[^']*')`)

// diskFile is a disk's new source: a file and its format.
type diskFile struct {
	Path   string
	Format string // qcow2, raw
}

// rewriteDiskSources returns doc with the source file of each disk named in
// files (by target device) replaced, its driver type set to the file's
// format, its <backingStore> removed (libvirt reads the chain from the new
// file) and the live-only index attribute dropped. Every other byte is
// kept. A device in files that has no file source and driver in doc is an
// error.
func rewriteDiskSources(doc string, files map[string]diskFile) (string, error) {
	type edit struct {
		from, to int
		text     string
	}
	var edits []edit
	dec := xml.NewDecoder(strings.NewReader(doc))
	var path []string // element names from the root
	type diskState struct {
		srcFrom, srcTo int // the <source ...> start tag
		src            string
		drvFrom, drvTo int      // the <driver ...> start tag
		backing        [][2]int // <backingStore> ranges
		backingStart   int
		dev            string
	}
	var disk *diskState
	done := map[string]bool{}
	for {
		before := int(dec.InputOffset())
		tok, err := dec.Token()
		if err == io.EOF {
			break
		}
		if err != nil {
			return "", fmt.Errorf("%w: domain XML: %v", snapshot.ErrInvalid, err)
		}
		after := int(dec.InputOffset())
		switch t := tok.(type) {
		case xml.StartElement:
			path = append(path, t.Name.Local)
			depth := len(path)
			switch {
			case depth == 3 && t.Name.Local == "disk" && path[1] == "devices":
				disk = &diskState{}
			case disk != nil && depth == 4 && t.Name.Local == "source":
				disk.srcFrom, disk.srcTo = before, after
				for _, a := range t.Attr {
					if a.Name.Local == "file" {
						disk.src = a.Value
					}
				}
			case disk != nil && depth == 4 && t.Name.Local == "driver":
				disk.drvFrom, disk.drvTo = before, after
			case disk != nil && depth == 4 && t.Name.Local == "backingStore":
				disk.backingStart = before
			case disk != nil && depth == 4 && t.Name.Local == "target":
				for _, a := range t.Attr {
					if a.Name.Local == "dev" {
						disk.dev = a.Value
					}
				}
			}
		case xml.EndElement:
			depth := len(path)
			switch {
			case disk != nil && depth == 4 && t.Name.Local == "backingStore":
				disk.backing = append(disk.backing, [2]int{disk.backingStart, after})
			case disk != nil && depth == 3 && t.Name.Local == "disk":
				if file, ok := files[disk.dev]; ok && disk.dev != "" {
					if disk.src == "" || disk.drvTo == 0 {
						return "", fmt.Errorf("%w: disk %q has no file source and driver to replace", snapshot.ErrInvalid, disk.dev)
					}
					drv := doc[disk.drvFrom:disk.drvTo]
					if typeAttr.MatchString(drv) {
						drv = typeAttr.ReplaceAllLiteralString(drv, " type="+quoteAttr(file.Format))
					} else {
						drv = insertAttr(drv, "type", file.Format)
					}
					src := doc[disk.srcFrom:disk.srcTo]
					src = fileAttr.ReplaceAllLiteralString(src, " file="+quoteAttr(file.Path))
					src = indexAttr.ReplaceAllLiteralString(src, "")
					es := []edit{{disk.drvFrom, disk.drvTo, drv}, {disk.srcFrom, disk.srcTo, src}}
					for _, b := range disk.backing {
						es = append(es, edit{b[0], b[1], ""})
					}
					slices.SortFunc(es, func(a, b edit) int { return a.from - b.from })
					edits = append(edits, es...)
					done[disk.dev] = true
				}
				disk = nil
			}
			path = path[:len(path)-1]
		}
	}
	for dev := range files {
		if !done[dev] {
			return "", fmt.Errorf("%w: the domain XML has no disk %q", snapshot.ErrNotFound, dev)
		}
	}
	// Edits are in document order and never overlap: a <source> tag and
	// the <backingStore> elements are siblings.
	var out strings.Builder
	at := 0
	for _, e := range edits {
		if e.from < at {
			return "", errors.New("BUG: overlapping XML edits")
		}
		out.WriteString(doc[at:e.from])
		out.WriteString(e.text)
		at = e.to
	}
	out.WriteString(doc[at:])
	return out.String(), nil
}

// quoteAttr returns s as a single-quoted XML attribute value.
func quoteAttr(s string) string {
	var b bytes.Buffer
	xml.EscapeText(&b, []byte(s))
	return "'" + strings.ReplaceAll(b.String(), "'", "&#39;") + "'"
}

// snapshotXML is the <domainsnapshot> document of an external snapshot of
// the given file disks (device -> new overlay file) with, when memFile is
// set, the memory state. Every other disk is left out (snapshot='no').
func snapshotXML(name string, overlays map[string]string, others []string, memFile string) string {
	var b strings.Builder
	b.WriteString("<domainsnapshot>\n  <name>")
	xml.EscapeText(&b, []byte(name))
	b.WriteString("</name>\n")
	if memFile != "" {
		b.WriteString("  <memory snapshot='external' file=" + quoteAttr(memFile) + "/>\n")
	}
	b.WriteString("  <disks>\n")
	for _, dev := range sortedKeys(overlays) {
		b.WriteString("    <disk name=" + quoteAttr(dev) + " snapshot='external'>\n")
		b.WriteString("      <driver type='qcow2'/>\n")
		b.WriteString("      <source file=" + quoteAttr(overlays[dev]) + "/>\n")
		b.WriteString("    </disk>\n")
	}
	for _, dev := range others {
		b.WriteString("    <disk name=" + quoteAttr(dev) + " snapshot='no'/>\n")
	}
	b.WriteString("  </disks>\n</domainsnapshot>\n")
	return b.String()
}
