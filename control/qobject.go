package control

import (
	"fmt"
	"sort"
	"strconv"
	"strings"
	"unicode/utf8"

	"github.com/imgfs/imgfs/formats"
)

// This file renders QAPI values the way qemu-img prints them: as JSON
// (qobject/json-writer.c, pretty mode) and as the indented "human" dump
// of block/qapi.c. Both walk a QDict, whose iteration order is not the
// schema order but the order of QEMU's hash table; qdictOrder reproduces
// it so that the output matches byte for byte.

// qdictBuckets is QDICT_BUCKET_MAX.
const qdictBuckets = 512

// tdbHash is the hash QDict uses for its keys (qobject/qdict.c).
func tdbHash(key string) uint32 {
	value := 0x238F13AF * uint32(len(key))
	for i := 0; i < len(key); i++ {
		value += uint32(key[i]) << (uint(i) * 5 % 24)
	}
	return 1103515243*value + 12345
}

// qdictOrder returns obj's members in the order QEMU iterates a QDict
// filled in obj's order: by bucket ascending, and within a bucket the
// most recently inserted key first (new entries go to the list head).
func qdictOrder(obj formats.Object) formats.Object {
	out := make(formats.Object, len(obj))
	copy(out, obj)
	idx := make(map[string]int, len(obj))
	for i, m := range obj {
		idx[m.Key] = i
	}
	sort.SliceStable(out, func(a, b int) bool {
		ba, bb := tdbHash(out[a].Key)%qdictBuckets, tdbHash(out[b].Key)%qdictBuckets
		if ba != bb {
			return ba < bb
		}
		return idx[out[a].Key] > idx[out[b].Key]
	})
	return out
}

// MarshalQJSON renders v as qobject_to_json_pretty does. v is one of the
// formats.Object value types: bool, int, int64, uint64, float64, string,
// formats.Object, []any, or nil (JSON null).
func MarshalQJSON(v any) string {
	w := jsonWriter{}
	w.value("", false, v)
	return w.b.String()
}

// MarshalQJSONCompact renders v as qobject_to_json does, on one line:
// the form of QEMU's json: file names.
func MarshalQJSONCompact(v any) string {
	w := jsonWriter{compact: true}
	w.value("", false, v)
	return w.b.String()
}

// jsonWriter follows json-writer.c: a value opens on a new line indented
// four spaces per open container, a comma ends every value but the last.
// Compact output has no line breaks and a space after each comma.
type jsonWriter struct {
	b         strings.Builder
	depth     int
	needComma bool
	compact   bool
}

func (w *jsonWriter) newline() {
	if w.compact {
		return
	}
	w.b.WriteByte('\n')
	w.b.WriteString(strings.Repeat("    ", w.depth))
}

func (w *jsonWriter) name(name string, named bool) {
	if w.needComma {
		w.b.WriteByte(',')
		if w.compact {
			w.b.WriteByte(' ')
		}
		w.newline()
	} else {
		if w.b.Len() > 0 {
			w.newline()
		}
		w.needComma = true
	}
	if named {
		writeQuoted(&w.b, name)
		w.b.WriteString(": ")
	}
}

func (w *jsonWriter) value(name string, named bool, v any) {
	w.name(name, named)
	switch v := v.(type) {
	case formats.Object:
		w.b.WriteByte('{')
		w.depth++
		w.needComma = false
		for _, m := range qdictOrder(v) {
			w.value(m.Key, true, m.Value)
		}
		w.depth--
		w.newline()
		w.b.WriteByte('}')
		w.needComma = true
	case []any:
		w.b.WriteByte('[')
		w.depth++
		w.needComma = false
		for _, e := range v {
			w.value("", false, e)
		}
		w.depth--
		w.newline()
		w.b.WriteByte(']')
		w.needComma = true
	case string:
		writeQuoted(&w.b, v)
	default:
		w.b.WriteString(scalarString(v))
	}
}

// scalarString prints a number, bool or null as QEMU does.
func scalarString(v any) string {
	switch v := v.(type) {
	case nil:
		return "null"
	case bool:
		return strconv.FormatBool(v)
	case int:
		return strconv.Itoa(v)
	case int64:
		return strconv.FormatInt(v, 10)
	case uint64:
		return strconv.FormatUint(v, 10)
	case float64:
		// json_writer_double: "%.17g".
		return strconv.FormatFloat(v, 'g', 17, 64)
	case string:
		return v
	}
	panic(fmt.Sprintf("control: %T is not a QAPI value", v))
}

// writeQuoted writes s as a JSON string the way json-writer.c's
// quoted_str does: short escapes for the usual controls, \uXXXX (upper
// case hex) for other control bytes, DEL and everything outside ASCII,
// surrogate pairs beyond the BMP, U+FFFD for invalid UTF-8. s ends at a
// NUL byte, as C strings do.
func writeQuoted(b *strings.Builder, s string) {
	b.WriteByte('"')
	for len(s) > 0 && s[0] != 0 {
		cp, n := modUTF8Codepoint(s)
		s = s[n:]
		switch cp {
		case '"':
			b.WriteString(`\"`)
		case '\\':
			b.WriteString(`\\`)
		case '\b':
			b.WriteString(`\b`)
		case '\f':
			b.WriteString(`\f`)
		case '\n':
			b.WriteString(`\n`)
		case '\r':
			b.WriteString(`\r`)
		case '\t':
			b.WriteString(`\t`)
		default:
			if cp < 0 {
				cp = 0xFFFD
			}
			switch {
			case cp > 0xFFFF:
				fmt.Fprintf(b, `\u%04X\u%04X`, 0xD800+((cp-0x10000)>>10), 0xDC00+((cp-0x10000)&0x3FF))
			case cp < 0x20 || cp >= 0x7F:
				fmt.Fprintf(b, `\u%04X`, cp)
			default:
				b.WriteByte(byte(cp))
			}
		}
	}
	b.WriteByte('"')
}

// modUTF8Codepoint decodes one code point of QEMU's "modified UTF-8"
// (util/unicode.c): like UTF-8, but "\xC0\x80" encodes U+0000, and
// surrogates, noncharacters and overlong forms are invalid (-1). It
// returns the code point and how many bytes it used; a sequence cut
// short by a missing continuation byte ends before that byte.
func modUTF8Codepoint(s string) (cp, n int) {
	c := s[0]
	switch {
	case c < 0x80:
		return int(c), 1
	case c >= 0xFE || c&0x40 == 0:
		return -1, 1
	}
	length := 0
	mask := byte(0x80)
	for ; c&mask != 0; mask >>= 1 {
		length++
	}
	cp = int(c & (mask - 1))
	n = 1
	for i := 1; i < length; i++ {
		// QEMU looks at no more than 6 bytes.
		if n >= len(s) || s[n]&0xC0 != 0x80 {
			return -1, n
		}
		cp = cp<<6 | int(s[n]&0x3F)
		n++
	}
	minCP := [...]int{0x80, 0x800, 0x10000, 0x200000, 0x4000000}
	switch {
	case cp > utf8.MaxRune:
		cp = -1
	case cp >= 0xFDD0 && cp <= 0xFDEF, cp&0xFFFE == 0xFFFE:
		cp = -1
	case cp >= 0xD800 && cp <= 0xDFFF:
		cp = -1
	case cp < minCP[length-2] && !(cp == 0 && length == 2):
		cp = -1
	}
	return cp, n
}

// humanDump renders v as block/qapi.c's dump_qobject does for "Format
// specific information": one "key: value" line per member, indented four
// spaces per level, dashes in keys shown as spaces, list elements as
// "[i]:", composite values on the lines below their key.
func humanDump(b *strings.Builder, indent int, v any) {
	pad := strings.Repeat("    ", indent)
	item := func(label string, v any) {
		switch v.(type) {
		case formats.Object, []any:
			fmt.Fprintf(b, "%s%s:\n", pad, label)
			humanDump(b, indent+1, v)
		default:
			fmt.Fprintf(b, "%s%s: ", pad, label)
			humanDump(b, indent+1, v)
			b.WriteByte('\n')
		}
	}
	switch v := v.(type) {
	case formats.Object:
		for _, m := range qdictOrder(v) {
			item(strings.ReplaceAll(m.Key, "-", " "), m.Value)
		}
	case []any:
		for i, e := range v {
			item(fmt.Sprintf("[%d]", i), e)
		}
	default:
		b.WriteString(scalarString(v))
	}
}
