package placement

import (
	"strconv"
	"strings"
	"unicode"
)

// Explanations and reasons are one line that ends up in logs, API answers
// and terminals. Workload values, policy values and driver messages can
// hold anything, so they pass through these before being shown.

// value shows a label, image or pattern as is when it is plain printable
// text, and quoted with escapes otherwise, so that "app\n" cannot pose as
// "app" or break the line.
func value(s string) string {
	if strings.IndexFunc(s, notPrintable) < 0 {
		return s
	}
	return strconv.Quote(s)
}

// prose shows an expression or a message: its white space, newlines
// included, folds into single spaces; other unprintable text is quoted.
func prose(s string) string {
	if strings.IndexFunc(s, notPrintable) < 0 {
		return s
	}
	return value(strings.Join(strings.Fields(s), " "))
}

// notPrintable is true for runes that must not appear raw in one line of
// text. The ASCII space is the only white space allowed.
func notPrintable(r rune) bool { return r != ' ' && !unicode.IsPrint(r) }
