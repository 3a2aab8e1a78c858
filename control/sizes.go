package control

import (
	"math"
	"strconv"
)

// sizeSuffixes are the binary unit prefixes size_to_str uses.
var sizeSuffixes = [...]string{"", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"}

// SizeToStr formats a byte count as QEMU's size_to_str (util/cutils.c)
// does: three significant digits ("%0.3g") and a binary unit, switching
// to the next unit once the value would print as 1000 or more, so that
// 1000 bytes read "0.977 KiB".
func SizeToStr(val uint64) string {
	// frexp(val * 1024/1000) - 1 is floor(log2) of the corrected value.
	_, exp := math.Frexp(float64(val) / (1000.0 / 1024.0))
	i := (exp - 1) / 10 // 0 for val == 0: Go, like C, truncates -1/10 to 0
	div := uint64(1) << (uint(i) * 10)
	return formatG3(float64(val)/float64(div)) + " " + sizeSuffixes[i] + "B"
}

// formatG3 is C's "%0.3g".
func formatG3(v float64) string {
	return strconv.FormatFloat(v, 'g', 3, 64)
}
