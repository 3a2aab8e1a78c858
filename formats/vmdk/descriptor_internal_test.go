package vmdk

import (
	"strings"
	"testing"
)

func TestScanExtent(t *testing.T) {
	for _, tc := range []struct {
		in      string
		want    extentLine
		matches int
	}{
		{`RW 2048 FLAT "a b.vmdk" 7`, extentLine{"RW", 2048, "FLAT", "a b.vmdk", 7}, 5},
		{`RW 2048 SPARSE "s.vmdk"`, extentLine{"RW", 2048, "SPARSE", "s.vmdk", -1}, 4},
		{`RDONLY 10 ZERO`, extentLine{access: "RDONLY", sectors: 10, typ: "ZERO", offset: -1}, 3},
		{`# Extent description`, extentLine{access: "#", offset: -1}, 1},
		{"", extentLine{offset: -1}, -1},
		// sscanf does not stop at the end of the line.
		{"RW\n5 VMFS\n\"x\"", extentLine{"RW", 5, "VMFS", "x", -1}, 4},
		// %10s takes ten bytes at most; the rest is the next field.
		{`ABCDEFGHIJK 5`, extentLine{access: "ABCDEFGHIJ", offset: -1}, 1},
	} {
		got, m := scanExtent(tc.in)
		if got != tc.want || m != tc.matches {
			t.Errorf("scanExtent(%q) = %+v, %d; want %+v, %d", tc.in, got, m, tc.want, tc.matches)
		}
	}
}

func TestParseExtents(t *testing.T) {
	desc := "RW 100 FLAT \"a\" 0\nRDONLY 100 FLAT \"b\" 0\nNOACCESS 5 FLAT \"c\" 0\nRW 9 ZERO\n" +
		"RW 0 SPARSE \"z\"\nRW 8 VMFS \"v\"\nRW 3 SESPARSE \"s\"\n"
	got, err := parseExtents(desc)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range got {
		names = append(names, e.filename)
	}
	if strings.Join(names, ",") != "a,v,s" {
		t.Errorf("extents %v, want a,v,s (RW lines of known types only)", names)
	}
	// sscanf skips the newline of a blank line, so an extent line right
	// after one is read twice, as QEMU reads it (and then fails to lock
	// the file twice for writing).
	if got, _ := parseExtents("\nRW 5 FLAT \"a\" 0\n"); len(got) != 2 {
		t.Errorf("extent after a blank line parsed %d times, want 2 as in QEMU", len(got))
	}
	for _, bad := range []string{"RW 100 FLAT \"a\"\n", "RW 100 VMFS \"a\" 5\r\n", "RW 1 SPARSE \"a\" 9"} {
		_, err := parseExtents(bad)
		if want := "Invalid extent line: " + strings.TrimSuffix(bad, "\n"); err == nil || err.Error() != want {
			t.Errorf("parseExtents(%q) = %v, want %q", bad, err, want)
		}
	}
}

func TestReadCID(t *testing.T) {
	for _, tc := range []struct {
		desc   string
		parent bool
		want   uint32
		ok     bool
	}{
		{"CID=fffffffe\nparentCID=ffffffff\n", false, 0xfffffffe, true},
		{"CID=fffffffe\nparentCID=ffffffff\n", true, 0xffffffff, true},
		{"CID=0x1a\n", false, 0x1a, true},
		{"CID=123456789\n", false, 0x23456789, true},
		{"CID=zz\n", false, 0, false},
		{"version=1\n", false, 0, false},
		// The first "CID" may be inside parentCID, as strstr finds it.
		{"parentCID=5\nCID=7\n", false, 5, true},
	} {
		got, ok := readCID(tc.desc, tc.parent)
		if got != tc.want || ok != tc.ok {
			t.Errorf("readCID(%q, %v) = %#x, %v; want %#x, %v", tc.desc, tc.parent, got, ok, tc.want, tc.ok)
		}
	}
}

func TestReplaceCID(t *testing.T) {
	buf := make([]byte, descSize)
	copy(buf, "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType=\"x\"\n")
	if !replaceCID(buf, 0xabc) {
		t.Fatal("replaceCID failed")
	}
	// The shorter CID moves the rest up; the old last bytes stay behind
	// the new end, as in QEMU.
	want := "# Disk DescriptorFile\nversion=1\nCID=abc\nparentCID=ffffffff\ncreateType=\"x\"\n"
	if got := cString(buf); got != want {
		t.Errorf("descriptor after replaceCID:\n%q\nwant\n%q", got, want)
	}
	if got := string(buf[len(want)+1 : len(want)+6]); got != "\"x\"\n" && got[:4] != "\"x\"\n" {
		t.Errorf("bytes after the new end = %q", got)
	}
	if replaceCID(make([]byte, descSize), 1) {
		t.Errorf("replaceCID without parentCID succeeded")
	}
}

func TestProbe(t *testing.T) {
	for _, tc := range []struct {
		buf  string
		want int
	}{
		{"KDMV\x01", 100},
		{"COWD\x01", 100},
		{"# Disk DescriptorFile\nversion=1\n", 100},
		{"# c\n   \r\nversion=3\r\n", 100},
		{"# c\nversion=4\n", 0},
		{"  x\nversion=1\n", 0},
		{"abc", 0},
	} {
		if got := probe([]byte(tc.buf), ""); got != tc.want {
			t.Errorf("probe(%q) = %d, want %d", tc.buf, got, tc.want)
		}
	}
}

// FuzzDescriptor feeds arbitrary text to the descriptor parsers, which
// must not panic and must return only extents QEMU would open.
func FuzzDescriptor(f *testing.F) {
	f.Add("# Disk DescriptorFile\nversion=1\nCID=a5d0a0d2\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\n" +
		"# Extent description\nRW 6291456 FLAT \"monolithicFlat-flat.vmdk\" 0\n\n# The Disk Data Base\n#DDB\n\n" +
		"ddb.virtualHWVersion = \"4\"\n")
	f.Add("createType=\"twoGbMaxExtentSparse\"\nparentFileNameHint=\"base.vmdk\"\nRW 4194304 SPARSE \"s-s001.vmdk\"\n")
	f.Add("RW 1 VMFS \"x\" 1\nRW -5 FLAT \"\" 0")
	f.Fuzz(func(t *testing.T, desc string) {
		probe([]byte(desc), "")
		parseQuoted(desc, "createType", 128)
		parentHint(desc)
		readCID(desc, false)
		readCID(desc, true)
		buf := make([]byte, descSize)
		copy(buf, desc)
		replaceCID(buf, 0x1234)
		exts, err := parseExtents(desc)
		if err != nil {
			return
		}
		for _, e := range exts {
			if e.access != "RW" || e.sectors <= 0 || e.offset < 0 && (e.typ == "FLAT" || e.typ == "VMFS") {
				t.Fatalf("parseExtents returned %+v", e)
			}
		}
	})
}
