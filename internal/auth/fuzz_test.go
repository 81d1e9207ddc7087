package auth

import (
	"strings"
	"testing"
)

// FuzzParse: the tokens file parser never panics, and whatever it accepts
// is consistent: unique names, a credential per entry, tenants only (and
// always) on submitters, and a token entry is found by nothing but its own
// token.
func FuzzParse(f *testing.F) {
	hash := strings.Repeat("0f", 32)
	for _, s := range []string{
		"",
		"# c\nname=a role=admin sha256=" + hash,
		"name=ci role=submitter tenants=a,b sha256=" + hash + "\nname=o role=operator cert=cn:ops",
		"name=f role=reader cert=uri:spiffe://x/y",
		"name=a role=admin sha256=" + hash + "\nname=a role=admin sha256=" + hash,
		"name=a role=submitter tenants=,, sha256=zz",
		"name==a role== =",
		"\x00\xff name=\u00e9 role=admin",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		ts, err := Parse(data)
		if err != nil {
			if ts != nil {
				t.Fatal("an error with entries")
			}
			return
		}
		names := map[string]bool{}
		for _, e := range ts.Entries() {
			if names[e.Name] {
				t.Fatalf("duplicate name %q accepted", e.Name)
			}
			names[e.Name] = true
			if !e.Role.Valid() {
				t.Fatalf("role %q accepted", e.Role)
			}
			if (e.Role == RoleSubmitter) != (len(e.Tenants) > 0) {
				t.Fatalf("entry %q: role %s with tenants %v", e.Name, e.Role, e.Tenants)
			}
			if e.Cert == "" && e.Hash == [32]byte{} && !strings.Contains(string(data), "sha256="+strings.Repeat("0", 64)) {
				t.Fatalf("entry %q has no credential", e.Name)
			}
		}
		if id, ok := ts.Lookup(string(data)); ok {
			t.Fatalf("the file's own text is a token of %q", id.Name)
		}
	})
}
