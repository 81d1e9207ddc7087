package placement

import (
	"cmp"
	"fmt"
	"slices"
	"strings"
)

// Error is one problem in a policy file, at a position an editor can jump to.
type Error struct {
	File string `json:"file"`
	// Line and Column are 1-based. Column is 0 when the YAML parser does not
	// say (syntax errors), and both are 0 for problems with the whole file.
	Line   int    `json:"line"`
	Column int    `json:"column"`
	Msg    string `json:"message"`
}

func (e Error) Error() string {
	if e.Line == 0 {
		return fmt.Sprintf("%s: %s", e.File, e.Msg)
	}
	if e.Column == 0 {
		return fmt.Sprintf("%s:%d: %s", e.File, e.Line, e.Msg)
	}
	return fmt.Sprintf("%s:%d:%d: %s", e.File, e.Line, e.Column, e.Msg)
}

// ErrorList is every problem found in a policy file, in file order. Parse
// returns it (as an error) so that an operator fixes a file in one pass.
// Get at it with errors.As.
type ErrorList []Error

func (l ErrorList) Error() string {
	var b strings.Builder
	for i, e := range l {
		if i > 0 {
			b.WriteByte('\n')
		}
		b.WriteString(e.Error())
	}
	return b.String()
}

// maxErrors caps the report: past this the file is garbage, not a policy
// with a few mistakes, and the list would only bury the first ones.
const maxErrors = 50

// errs collects positioned errors while a file is checked.
type errs struct {
	file string
	list ErrorList
	full bool
}

func (e *errs) add(line, col int, format string, args ...any) {
	if e.full {
		return
	}
	if len(e.list) == maxErrors {
		e.full = true
		e.list = append(e.list, Error{File: e.file, Line: line, Column: col,
			Msg: fmt.Sprintf("too many errors (more than %d); fix these first", maxErrors)})
		return
	}
	e.list = append(e.list, Error{File: e.file, Line: line, Column: col, Msg: fmt.Sprintf(format, args...)})
}

// err returns the sorted list, or nil when there is nothing to report.
func (e *errs) err() error {
	if len(e.list) == 0 {
		return nil
	}
	// The cap marker stays last whatever its position.
	body := e.list
	if e.full {
		body = e.list[:len(e.list)-1]
	}
	slices.SortStableFunc(body, func(a, b Error) int {
		return cmp.Or(cmp.Compare(a.Line, b.Line), cmp.Compare(a.Column, b.Column))
	})
	return e.list
}
