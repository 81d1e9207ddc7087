package placement

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

var update = flag.Bool("update", false, "rewrite testdata/*.golden from the current output")

// TestParseGolden parses every testdata/*.yaml and compares the outcome with
// its .golden file: the positioned errors, or for a valid file "ok" and the
// rules as the API describes them.
func TestParseGolden(t *testing.T) {
	files, err := filepath.Glob("testdata/*.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if len(files) < 15 {
		t.Fatalf("found only %d golden inputs", len(files))
	}
	for _, file := range files {
		name := strings.TrimSuffix(filepath.Base(file), ".yaml")
		t.Run(name, func(t *testing.T) {
			data, err := os.ReadFile(file)
			if err != nil {
				t.Fatal(err)
			}
			got := describeParse(file, data)
			golden := strings.TrimSuffix(file, ".yaml") + ".golden"
			if *update {
				if err := os.WriteFile(golden, []byte(got), 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatalf("%v (run go test -update to create it)", err)
			}
			if got != string(want) {
				t.Errorf("%s differs from %s:\n--- got\n%s--- want\n%s", file, golden, got, want)
			}
		})
	}
}

func describeParse(file string, data []byte) string {
	p, err := Parse(file, data)
	var b strings.Builder
	if err != nil {
		if p != nil {
			fmt.Fprintf(&b, "BUG: both a policy and an error\n")
		}
		var list ErrorList
		if !errors.As(err, &list) {
			fmt.Fprintf(&b, "BUG: error is %T, not ErrorList\n", err)
		}
		b.WriteString(err.Error())
		b.WriteByte('\n')
		return b.String()
	}
	fmt.Fprintf(&b, "ok %s default=%s source=%s\n", p.Version(), p.Default(), p.Source())
	for _, r := range p.Rules() {
		fmt.Fprintf(&b, "rule %s line=%d outcome=%s\n", r.Name, r.Line, r.Outcome)
		if r.Description != "" {
			fmt.Fprintf(&b, "  description: %s\n", r.Description)
		}
		if r.Match != "" {
			fmt.Fprintf(&b, "  match: %s\n", r.Match)
		}
		if r.When != "" {
			fmt.Fprintf(&b, "  when: %q\n", r.When)
		}
	}
	return b.String()
}

func TestParseErrorsArePositioned(t *testing.T) {
	_, err := Parse("p.yaml", []byte(`apiVersion: berth.dev/v1
kind: IsolationPolicy
default: container
rules:
  - name: a
    match: {privileged: maybe}
    isolation: vm
  - name: a
    when: workload.nope
    action: allow
`))
	var list ErrorList
	if !errors.As(err, &list) {
		t.Fatalf("error %v is not an ErrorList", err)
	}
	if len(list) != 4 {
		t.Fatalf("want 4 errors, got %d:\n%v", len(list), err)
	}
	for i, e := range list {
		if e.File != "p.yaml" || e.Line < 1 || e.Column < 1 || e.Msg == "" {
			t.Errorf("error %d is not fully positioned: %+v", i, e)
		}
		if i > 0 && (e.Line < list[i-1].Line || e.Line == list[i-1].Line && e.Column < list[i-1].Column) {
			t.Errorf("errors out of order: %v before %v", list[i-1], e)
		}
	}
	if lines := strings.Split(err.Error(), "\n"); len(lines) != len(list) || !strings.HasPrefix(lines[0], "p.yaml:6:") {
		t.Errorf("Error() = %q, want one p.yaml:line:col line per error", err.Error())
	}
}

func TestParseTooLarge(t *testing.T) {
	data := []byte("apiVersion: berth.dev/v1\n# " + strings.Repeat("x", MaxSize) + "\n")
	_, err := Parse("big.yaml", data)
	var list ErrorList
	if !errors.As(err, &list) || len(list) != 1 || !strings.Contains(list[0].Msg, "the limit is 1048576") {
		t.Fatalf("want one size error, got %v", err)
	}
}

func TestParseCapsErrors(t *testing.T) {
	var b strings.Builder
	b.WriteString("apiVersion: berth.dev/v1\nkind: IsolationPolicy\ndefault: container\nrules:\n")
	for i := range 200 {
		fmt.Fprintf(&b, "  - name: r%d\n    isolation: tank\n    when: 'true'\n", i)
	}
	_, err := Parse("many.yaml", []byte(b.String()))
	var list ErrorList
	if !errors.As(err, &list) {
		t.Fatalf("want an ErrorList, got %v", err)
	}
	if len(list) != maxErrors+1 || !strings.Contains(list[len(list)-1].Msg, "too many errors") {
		t.Fatalf("want %d errors and a final too-many marker, got %d, last %v", maxErrors, len(list), list[len(list)-1])
	}
}

func TestParseTooManyRules(t *testing.T) {
	var b strings.Builder
	b.WriteString("apiVersion: berth.dev/v1\nkind: IsolationPolicy\ndefault: container\nrules:\n")
	for i := range maxRules + 1 {
		fmt.Fprintf(&b, "  - {name: r%d, isolation: vm, match: {privileged: true}}\n", i)
	}
	_, err := Parse("rules.yaml", []byte(b.String()))
	if err == nil || !strings.Contains(err.Error(), "rules.yaml:5:3: 1001 rules; the limit is 1000") {
		t.Fatalf("want a rule count error, got %v", err)
	}
}

func TestVersionIsContentHash(t *testing.T) {
	a := mustParse(t, testPolicy)
	b, err := Parse("elsewhere.yaml", []byte(testPolicy))
	if err != nil {
		t.Fatal(err)
	}
	c := mustParse(t, testPolicy+"# a comment changes the bytes\n")
	if a.Version() != b.Version() {
		t.Errorf("same bytes, different versions: %s, %s", a.Version(), b.Version())
	}
	if a.Version() == c.Version() {
		t.Errorf("different bytes, same version %s", a.Version())
	}
	if len(a.Version()) != len("sha256:")+16 {
		t.Errorf("version %q is not sha256: and 16 hex digits", a.Version())
	}
	if b.Source() != "elsewhere.yaml" {
		t.Errorf("Source() = %q", b.Source())
	}
}

func TestRulesIsACopy(t *testing.T) {
	p := mustParse(t, testPolicy)
	rs := p.Rules()
	rs[0].Name = "changed"
	rs[0].Outcome = OutcomeDeny
	if again := p.Rules(); again[0].Name != "untrusted" || again[0].Outcome != OutcomeVM {
		t.Errorf("changing Rules() changed the policy: %+v", again[0])
	}
}
