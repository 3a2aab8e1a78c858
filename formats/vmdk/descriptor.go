package vmdk

import (
	"bytes"
	"fmt"
	"strconv"
	"strings"
)

// The text descriptor: "# Disk DescriptorFile", key=value lines (CID,
// parentCID, createType, parentFileNameHint) and extent lines
// ("RW 2048 FLAT "x-flat.vmdk" 0"). QEMU reads it with strstr and
// sscanf rather than line by line; the helpers here reproduce those
// semantics, since they decide which files open and what info shows.

// probe is vmdk_probe: the sparse magics, or a text file whose first
// non-comment, non-blank line is "version=1", "2" or "3".
func probe(buf []byte, _ string) int {
	if len(buf) < 4 {
		return 0
	}
	if m := string(buf[:4]); m == magicCOWD || m == magicKDMV {
		return 100
	}
	p := 0
	for p < len(buf) {
		switch buf[p] {
		case '#':
			for p < len(buf) && buf[p] != '\n' {
				p++
			}
			p++
			continue
		case ' ':
			for p < len(buf) && buf[p] == ' ' {
				p++
			}
			if p < len(buf) && buf[p] == '\r' {
				p++
			}
			if p == len(buf) || buf[p] != '\n' {
				return 0
			}
			p++
			continue
		}
		rest := buf[p:]
		for _, v := range []string{"version=1", "version=2", "version=3"} {
			if bytes.HasPrefix(rest, []byte(v+"\n")) || bytes.HasPrefix(rest, []byte(v+"\r\n")) {
				return 100
			}
		}
		return 0
	}
	return 0
}

// cString is the descriptor up to its first NUL, as C string functions
// see it.
func cString(b []byte) string {
	if i := bytes.IndexByte(b, 0); i >= 0 {
		b = b[:i]
	}
	return string(b)
}

// parseQuoted is vmdk_parse_description: the text after `name="` up to
// the next quote, at most max-1 bytes. ok is false when name is
// missing, unterminated or too long.
func parseQuoted(desc, name string, max int) (string, bool) {
	i := strings.Index(desc, name)
	if i < 0 {
		return "", false
	}
	start := i + len(name) + 2
	if start >= len(desc) {
		return "", false
	}
	end := strings.IndexByte(desc[start:], '"')
	if end < 0 || max < end+1 {
		return "", false
	}
	return desc[start : start+end], true
}

// readCID finds "CID" (or "parentCID") in a descriptor as vmdk_read_cid
// does: the first occurrence, skipping it and one more byte ('='), then
// a hexadecimal number as sscanf("%x") reads it into 32 bits.
func readCID(desc string, parent bool) (uint32, bool) {
	name := "CID"
	if parent {
		name = "parentCID"
	}
	i := strings.Index(desc, name)
	if i < 0 {
		return 0, false
	}
	p := desc[min(i+len(name)+1, len(desc)):]
	p = strings.TrimLeft(p, " \t\n\v\f\r")
	neg := false
	if p != "" && (p[0] == '-' || p[0] == '+') {
		neg = p[0] == '-'
		p = p[1:]
	}
	if len(p) > 2 && p[0] == '0' && (p[1] == 'x' || p[1] == 'X') && digitValue(p[2]) < 16 {
		p = p[2:]
	}
	n := 0
	var v uint64
	overflow := false
	for n < len(p) && digitValue(p[n]) < 16 {
		if v > (^uint64(0))>>4 {
			overflow = true
		}
		v = v<<4 | uint64(digitValue(p[n]))
		n++
	}
	if n == 0 {
		return 0, false
	}
	if overflow {
		v = ^uint64(0)
	}
	if neg {
		v = -v
	}
	return uint32(v), true
}

func digitValue(c byte) int {
	switch {
	case c >= '0' && c <= '9':
		return int(c - '0')
	case c >= 'a' && c <= 'f':
		return int(c-'a') + 10
	case c >= 'A' && c <= 'F':
		return int(c-'A') + 10
	}
	return 99
}

// parentHint is vmdk_parent_open: the parentFileNameHint value, "" when
// there is none. ok is false for an unterminated or overlong value.
func parentHint(desc string) (string, bool) {
	const key = "parentFileNameHint"
	i := strings.Index(desc, key)
	if i < 0 {
		return "", true
	}
	start := min(i+len(key)+2, len(desc))
	end := strings.IndexByte(desc[start:], '"')
	// bs->auto_backing_file holds PATH_MAX bytes with the NUL.
	if end < 0 || end > 4095 {
		return "", false
	}
	return desc[start : start+end], true
}

// replaceCID is vmdk_write_cid on a DESC_SIZE buffer: the CID value is
// rewritten in place and the text from "parentCID" on is appended after
// it, C-string style, so bytes of the old text past the new end stay.
func replaceCID(buf []byte, cid uint32) bool {
	buf[len(buf)-1] = 0
	desc := cString(buf)
	pi := strings.Index(desc, "parentCID")
	if pi < 0 {
		return false
	}
	tail := desc[pi:]
	ci := strings.Index(desc, "CID")
	if ci < 0 {
		return true
	}
	pos := ci + len("CID") + 1
	if pos >= len(buf) {
		return true
	}
	s := strconv.FormatUint(uint64(cid), 16) + "\n"
	// snprintf into the rest of the buffer, then pstrcat the tail.
	n := copy(buf[pos:len(buf)-1], s)
	buf[pos+n] = 0
	end := pos + n
	n = copy(buf[end:len(buf)-1], tail)
	buf[end+n] = 0
	return true
}

// extentLine is one parsed extent line of a descriptor.
type extentLine struct {
	access   string
	sectors  int64
	typ      string
	filename string
	offset   int64 // sectors, FLAT and VMFS only
}

// errInvalidLine reports a malformed extent line with QEMU's message.
type errInvalidLine string

// scanExtent reproduces
//
//	sscanf(p, "%10s %" SCNd64 " %10s \"%511[^\n\r\"]\" %" SCNd64, ...)
//
// on the text from p to the end of the descriptor (sscanf does not stop
// at the line end), returning how many fields matched.
func scanExtent(s string) (e extentLine, matches int) {
	e.offset = -1
	p := 0
	skipSpace := func() {
		for p < len(s) && isSpace(s[p]) {
			p++
		}
	}
	word := func(max int) (string, bool) {
		skipSpace()
		start := p
		for p < len(s) && !isSpace(s[p]) && p-start < max {
			p++
		}
		return s[start:p], p > start
	}
	number := func() (int64, bool) {
		skipSpace()
		start := p
		if p < len(s) && (s[p] == '+' || s[p] == '-') {
			p++
		}
		d := p
		for p < len(s) && s[p] >= '0' && s[p] <= '9' {
			p++
		}
		if p == d {
			p = start
			return 0, false
		}
		v, err := strconv.ParseInt(s[start:p], 10, 64)
		if err != nil {
			// strtoll saturates.
			if s[start] == '-' {
				v = -1 << 63
			} else {
				v = 1<<63 - 1
			}
		}
		return v, true
	}
	var ok bool
	if e.access, ok = word(10); !ok {
		return e, -1
	}
	if e.sectors, ok = number(); !ok {
		return e, 1
	}
	if e.typ, ok = word(10); !ok {
		return e, 2
	}
	skipSpace()
	if p >= len(s) || s[p] != '"' {
		return e, 3
	}
	p++
	start := p
	for p < len(s) && p-start < 511 && s[p] != '\n' && s[p] != '\r' && s[p] != '"' {
		p++
	}
	if p == start {
		return e, 3
	}
	e.filename = s[start:p]
	if p >= len(s) || s[p] != '"' {
		return e, 4
	}
	p++
	if e.offset, ok = number(); !ok {
		e.offset = -1
		return e, 4
	}
	return e, 5
}

func isSpace(c byte) bool {
	return c == ' ' || c == '\t' || c == '\n' || c == '\v' || c == '\f' || c == '\r'
}

// parseExtents walks the descriptor line by line as vmdk_parse_extents
// does and returns the extents QEMU opens: only RW lines of the types
// FLAT, SPARSE, VMFS, VMFSSPARSE and SESPARSE with a positive size.
// RDONLY and NOACCESS lines, ZERO extents and anything unparsable are
// skipped, as in QEMU; a line of a known type with the wrong number of
// fields is an error.
func parseExtents(desc string) ([]extentLine, error) {
	var out []extentLine
	for p := 0; p < len(desc); {
		next := strings.IndexByte(desc[p:], '\n')
		lineEnd := len(desc)
		if next >= 0 {
			lineEnd = p + next
		}
		e, matches := scanExtent(desc[p:])
		line := desc[p:lineEnd]
		if next >= 0 {
			p = lineEnd + 1
		} else {
			p = len(desc)
		}
		if matches < 4 || e.access != "RW" {
			continue
		}
		switch {
		case e.typ == "FLAT":
			if matches != 5 || e.offset < 0 {
				return nil, errInvalidLine(line)
			}
		case e.typ == "VMFS":
			if matches != 4 {
				return nil, errInvalidLine(line)
			}
			e.offset = 0
		case matches != 4:
			return nil, errInvalidLine(line)
		}
		switch e.typ {
		case "FLAT", "SPARSE", "VMFS", "VMFSSPARSE", "SESPARSE":
		default:
			continue
		}
		if e.sectors <= 0 {
			continue
		}
		out = append(out, e)
	}
	return out, nil
}

func (e errInvalidLine) Error() string { return fmt.Sprintf("Invalid extent line: %s", string(e)) }

// supportedCreateTypes are the descriptor createType values QEMU opens
// from a text descriptor.
var supportedCreateTypes = map[string]bool{
	"monolithicFlat": true, "vmfs": true, "vmfsSparse": true, "seSparse": true,
	"twoGbMaxExtentSparse": true, "twoGbMaxExtentFlat": true,
}
