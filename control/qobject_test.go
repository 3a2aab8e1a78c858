package control

import (
	"encoding/json"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/imgfs/imgfs/formats"
)

func keys(o formats.Object) string {
	var k []string
	for _, m := range o {
		k = append(k, m.Key)
	}
	return strings.Join(k, ",")
}

// The orders below are what qemu-img 7.2 prints for these structures.
func TestQDictOrder(t *testing.T) {
	obj := func(names ...string) formats.Object {
		var o formats.Object
		for _, n := range names {
			o = append(o, formats.Member{Key: n, Value: 1})
		}
		return o
	}
	tests := []struct {
		name  string
		in    formats.Object
		order string
	}{
		{"ImageInfo", obj("filename", "format", "dirty-flag", "actual-size", "virtual-size", "cluster-size",
			"backing-filename", "full-backing-filename", "backing-filename-format", "snapshots", "format-specific"),
			"backing-filename-format,snapshots,virtual-size,filename,cluster-size,format,actual-size,format-specific,full-backing-filename,backing-filename,dirty-flag"},
		{"ImageCheck", obj("filename", "format", "check-errors", "image-end-offset", "corruptions", "leaks",
			"corruptions-fixed", "leaks-fixed", "total-clusters", "allocated-clusters", "fragmented-clusters", "compressed-clusters"),
			"image-end-offset,compressed-clusters,total-clusters,corruptions,corruptions-fixed,check-errors,leaks,leaks-fixed,allocated-clusters,filename,format,fragmented-clusters"},
		{"SnapshotInfo", obj("id", "name", "vm-state-size", "date-sec", "date-nsec", "vm-clock-sec", "vm-clock-nsec", "icount"),
			"icount,vm-clock-nsec,name,date-sec,date-nsec,vm-clock-sec,id,vm-state-size"},
		{"Qcow2BitmapInfo", obj("name", "granularity", "flags"), "flags,name,granularity"},
	}
	for _, tc := range tests {
		if got := keys(qdictOrder(tc.in)); got != tc.order {
			t.Errorf("%s: order\n got %s\nwant %s", tc.name, got, tc.order)
		}
	}
}

// Within one bucket the key inserted last comes first.
func TestQDictOrderSameBucket(t *testing.T) {
	// Find two keys sharing a bucket.
	seen := map[uint32]string{}
	var a, b string
	for i := 0; a == ""; i++ {
		k := "k" + strings.Repeat("x", i%7) + string(rune('a'+i%26)) + string(rune('a'+i/26%26))
		h := tdbHash(k) % qdictBuckets
		if prev, ok := seen[h]; ok && prev != k {
			a, b = prev, k
		}
		seen[h] = k
	}
	got := keys(qdictOrder(formats.Object{{Key: a, Value: 1}, {Key: b, Value: 2}}))
	if want := b + "," + a; got != want {
		t.Errorf("same bucket: got %s, want %s", got, want)
	}
}

func TestMarshalQJSON(t *testing.T) {
	tests := []struct {
		name string
		in   any
		want string
	}{
		{"scalars", formats.Object{{Key: "a", Value: int64(-1)}, {Key: "b", Value: true}},
			"{\n    \"a\": -1,\n    \"b\": true\n}"},
		{"empty list", formats.Object{{Key: "flags", Value: []any{}}}, "{\n    \"flags\": [\n    ]\n}"},
		{"empty object", formats.Object{}, "{\n}"},
		{"nested list", []any{formats.Object{{Key: "x", Value: uint64(1 << 63)}}, "s"},
			"[\n    {\n        \"x\": 9223372036854775808\n    },\n    \"s\"\n]"},
		{"escapes", "q\"b\\s/\b\f\n\r\t\x01\x7f", `"q\"b\\s/\b\f\n\r\t\u0001\u007F"`},
		{"non-ASCII", "é€😀", `"\u00E9\u20AC\uD83D\uDE00"`},
		{"invalid UTF-8", "a\xffb\xc3", `"a\uFFFDb\uFFFD"`},
		{"overlong", "\xc0\xaf\xc0\x80", `"\uFFFD\u0000"`},
		{"surrogate and noncharacter", "\xed\xa0\x80\xef\xbf\xbe", `"\uFFFD\uFFFD"`},
		{"truncated sequence keeps next byte", "\xe2\x82A", `"\uFFFDA"`},
		{"NUL ends the string", "ab\x00cd", `"ab"`},
		{"null", nil, "null"},
	}
	for _, tc := range tests {
		if got := MarshalQJSON(tc.in); got != tc.want {
			t.Errorf("%s:\n got %q\nwant %q", tc.name, got, tc.want)
		}
	}
}

// The qcow2 data of an image with one bitmap, as `qemu-img info` shows it.
func TestHumanDump(t *testing.T) {
	data := formats.Object{
		{Key: "compat", Value: "1.1"},
		{Key: "lazy-refcounts", Value: false},
		{Key: "bitmaps", Value: []any{formats.Object{
			{Key: "name", Value: "bm0"},
			{Key: "granularity", Value: int64(65536)},
			{Key: "flags", Value: []any{"auto"}},
		}}},
		{Key: "refcount-bits", Value: int64(16)},
		{Key: "corrupt", Value: false},
		{Key: "extended-l2", Value: false},
		{Key: "compression-type", Value: "zlib"},
	}
	want := `    compat: 1.1
    compression type: zlib
    lazy refcounts: false
    bitmaps:
        [0]:
            flags:
                [0]: auto
            name: bm0
            granularity: 65536
    refcount bits: 16
    corrupt: false
    extended l2: false
`
	var b strings.Builder
	humanDump(&b, 1, data)
	if b.String() != want {
		t.Errorf("got\n%s\nwant\n%s", b.String(), want)
	}
}

// FuzzQuotedString checks the JSON string writer on arbitrary bytes
// (file and bitmap names come from images): the output is printable
// ASCII and valid JSON, and it round-trips every string QEMU treats as
// valid text.
func FuzzQuotedString(f *testing.F) {
	for _, s := range []string{"", "plain", "é€😀", "\xff\xc0\x80", "\xed\xa0\x80", "a\x00b", "\"\\\n\x7f"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		var b strings.Builder
		writeQuoted(&b, s)
		out := b.String()
		for i := 0; i < len(out); i++ {
			if out[i] < 0x20 || out[i] >= 0x7f {
				t.Fatalf("byte %#x in output %q", out[i], out)
			}
		}
		var back string
		if err := json.Unmarshal([]byte(out), &back); err != nil {
			t.Fatalf("output %q is not a JSON string: %v", out, err)
		}
		text, _, _ := strings.Cut(s, "\x00")
		if utf8.ValidString(text) && !strings.ContainsFunc(text, qemuRejects) && back != text {
			t.Fatalf("round trip of %q gave %q", text, back)
		}
	})
}

// qemuRejects reports the code points QEMU's modified UTF-8 decoder
// refuses although they are valid UTF-8: noncharacters.
func qemuRejects(r rune) bool { return r >= 0xFDD0 && r <= 0xFDEF || r&0xFFFE == 0xFFFE }

func TestMarshalQJSONCompact(t *testing.T) {
	v := formats.Object{
		{Key: "driver", Value: "luks"},
		{Key: "file", Value: formats.Object{{Key: "driver", Value: "file"}, {Key: "filename", Value: "t.luks"}}},
		{Key: "key-secret", Value: "sec0"},
	}
	// As qemu-img 7.2 names an image opened with --image-opts
	// driver=luks,file.filename=t.luks,key-secret=sec0.
	want := `{"driver": "luks", "file": {"driver": "file", "filename": "t.luks"}, "key-secret": "sec0"}`
	if got := MarshalQJSONCompact(v); got != want {
		t.Errorf("got  %s\nwant %s", got, want)
	}
	if got := MarshalQJSONCompact(formats.Object{}); got != "{}" {
		t.Errorf("empty object: %s", got)
	}
}
