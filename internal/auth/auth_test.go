package auth

import (
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"io"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestParse(t *testing.T) {
	tok, line, err := NewToken("ci", RoleSubmitter, []string{"team-a", "team-b"})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(tok, TokenPrefix) || len(tok) != len(TokenPrefix)+43 {
		t.Fatalf("token %q: want %s and 43 base64url characters", tok, TokenPrefix)
	}
	if strings.Contains(line, tok) || strings.Contains(line, strings.TrimPrefix(tok, TokenPrefix)) {
		t.Fatalf("the tokens-file line holds the token itself: %s", line)
	}
	file := "# comment\n\n" + line + "\nname=ops role=operator cert=cn:ops-1\n  name=fleet role=reader cert=uri:spiffe://example.org/fleet  \n"
	ts, err := Parse([]byte(file))
	if err != nil {
		t.Fatal(err)
	}
	es := ts.Entries()
	if len(es) != 3 || es[0].Name != "ci" || es[0].Line != 3 || es[1].Cert != "cn:ops-1" || es[2].Role != RoleReader {
		t.Fatalf("entries %+v", es)
	}
	id, ok := ts.Lookup(tok)
	if !ok || id.Name != "ci" || id.Role != RoleSubmitter || id.Via != ViaToken || strings.Join(id.Tenants, ",") != "team-a,team-b" {
		t.Fatalf("lookup: %+v %v", id, ok)
	}
	for _, bad := range []string{"", tok + "x", tok[:len(tok)-1], "berth_", strings.ToUpper(tok)} {
		if id, ok := ts.Lookup(bad); ok {
			t.Errorf("lookup %q matched %+v", bad, id)
		}
	}
	cert := &x509.Certificate{Subject: pkix.Name{CommonName: "ops-1"}}
	if id, ok := ts.LookupCert(cert); !ok || id.Name != "ops" || id.Via != ViaClientCert {
		t.Errorf("cert by CN: %+v %v", id, ok)
	}
	u, _ := url.Parse("spiffe://example.org/fleet")
	cert = &x509.Certificate{Subject: pkix.Name{CommonName: "someone"}, URIs: []*url.URL{u}}
	if id, ok := ts.LookupCert(cert); !ok || id.Name != "fleet" {
		t.Errorf("cert by URI SAN: %+v %v", id, ok)
	}
	if id, ok := ts.LookupCert(&x509.Certificate{Subject: pkix.Name{CommonName: "ops-2"}}); ok {
		t.Errorf("unknown cert matched %+v", id)
	}
	// A token entry's hash is not a cert identity and the other way round.
	if _, ok := ts.Lookup("cn:ops-1"); ok {
		t.Error("a cert identity worked as a token")
	}
}

func TestParseErrors(t *testing.T) {
	hash := strings.Repeat("ab", 32)
	for _, tc := range []struct{ file, want string }{
		{"name=a role=admin", "exactly one of sha256"},
		{"name=a role=admin sha256=" + hash + " cert=cn:x", "exactly one of sha256"},
		{"name=a role=root sha256=" + hash, `role "root"`},
		{"role=admin sha256=" + hash, "name is missing"},
		{"name=a sha256=" + hash, "role is missing"},
		{"name=a role=admin sha256=abc", "64 hex digits"},
		{"name=a role=submitter sha256=" + hash, "needs tenants"},
		{"name=a role=submitter tenants= sha256=" + hash, `tenant ""`},
		{"name=a role=submitter tenants=Team sha256=" + hash, `tenant "Team"`},
		{"name=a role=submitter tenants=x,x sha256=" + hash, "listed twice"},
		{"name=a role=reader tenants=x sha256=" + hash, "submitters only"},
		{"name=a role=admin cert=dn:x", "cn:COMMON-NAME"},
		{"name=a role=admin cert=cn:", "cn:COMMON-NAME"},
		{"name=-a role=admin sha256=" + hash, `name "-a"`},
		{"name=a role=admin sha256=" + hash + " colour=red", `unknown key "colour"`},
		{"name=a name=b role=admin sha256=" + hash, "given twice"},
		{"name=a role=admin sha256=" + hash + " junk", `"junk" is not KEY=VALUE`},
		{"name=a role=admin sha256=" + hash + "\nname=a role=reader cert=cn:x", "line 2: name \"a\" is already used on line 1"},
		{"name=a role=admin sha256=" + hash + "\nname=b role=reader sha256=" + hash, "line 2: the same credential"},
		{strings.Repeat("#", MaxFileSize+1), "more than"},
	} {
		_, err := Parse([]byte(tc.file))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Parse(%.60q) = %v, want an error with %q", tc.file, err, tc.want)
		}
	}
	// Every bad line is reported, with its number.
	_, err := Parse([]byte("name=a role=x sha256=" + hash + "\n# ok\nname=b role=admin\n"))
	var le *LineError
	if !errors.As(err, &le) || !strings.Contains(err.Error(), "line 1:") || !strings.Contains(err.Error(), "line 3:") {
		t.Errorf("errors %v: want lines 1 and 3", err)
	}
}

func TestNewTokenRefusesBadEntries(t *testing.T) {
	if _, _, err := NewToken("bad name", RoleAdmin, nil); err == nil {
		t.Error("a name with a space was accepted")
	}
	if _, _, err := NewToken("ci", RoleSubmitter, nil); err == nil {
		t.Error("a submitter without tenants was accepted")
	}
	a, _, _ := NewToken("x", RoleAdmin, nil)
	b, _, _ := NewToken("x", RoleAdmin, nil)
	if a == b {
		t.Error("two tokens are equal")
	}
}

func TestSubmitTenant(t *testing.T) {
	one := &Identity{Name: "ci", Role: RoleSubmitter, Tenants: []string{"a"}}
	two := &Identity{Name: "ci2", Role: RoleSubmitter, Tenants: []string{"a", "b"}}
	for _, tc := range []struct {
		id        *Identity
		requested string
		want      string
		err       error
	}{
		{one, "", "a", nil},
		{one, "a", "a", nil},
		{one, "b", "", ErrTenantNotAllowed},
		{two, "", "", ErrTenantRequired},
		{two, "b", "b", nil},
		{two, "c", "", ErrTenantNotAllowed},
		{Anonymous, "", "", nil},
		{Anonymous, "z", "z", nil},
		{&Identity{Role: RoleOperator}, "q", "q", nil},
	} {
		got, err := SubmitTenant(tc.id, tc.requested)
		if got != tc.want || !errors.Is(err, tc.err) {
			t.Errorf("SubmitTenant(%s %v, %q) = %q, %v; want %q, %v", tc.id.Role, tc.id.Tenants, tc.requested, got, err, tc.want, tc.err)
		}
	}
	if one.CanSee("") || one.CanSee("b") || !one.CanSee("a") || !Anonymous.CanSee("") {
		t.Error("CanSee")
	}
	var none *Identity
	if none.CanSee("a") || Authorize(none, ActWorkloadRead) || !Authorize(none, ActPublic) {
		t.Error("a nil identity may do more than public actions")
	}
	if !Authorize(&Identity{Role: RoleAdmin}, ActUnknown) || Authorize(&Identity{Role: RoleOperator}, ActUnknown) {
		t.Error("unknown actions are for admins only")
	}
}

func TestStoreReload(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "tokens")
	tokA, lineA, _ := NewToken("a", RoleAdmin, nil)
	tokB, lineB, _ := NewToken("b", RoleReader, nil)
	if err := os.WriteFile(file, []byte(lineA+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	s, err := Open(file, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, ok := s.Lookup(tokA); !ok {
		t.Fatal("token a unknown")
	}
	waitFor := func(what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting for %s", what)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	// An append (what berth token add does) is picked up.
	f, _ := os.OpenFile(file, os.O_APPEND|os.O_WRONLY, 0)
	f.WriteString(lineB + "\n")
	f.Close()
	waitFor("token b", func() bool { _, ok := s.Lookup(tokB); return ok })
	// A broken edit keeps the entries in force.
	os.WriteFile(file, []byte("name=a role=nope\n"), 0o600)
	waitFor("the rejection", func() bool { return s.LastError() != nil })
	if _, ok := s.Lookup(tokB); !ok {
		t.Fatal("a rejected edit dropped the entries in force")
	}
	// Replacing the file by rename (editors, config managers) revokes b.
	tmp := filepath.Join(dir, "tokens.new")
	os.WriteFile(tmp, []byte(lineA+"\n"), 0o600)
	if err := os.Rename(tmp, file); err != nil {
		t.Fatal(err)
	}
	waitFor("token b revoked", func() bool { _, ok := s.Lookup(tokB); return !ok })
	if _, ok := s.Lookup(tokA); !ok || s.LastError() != nil {
		t.Fatalf("after the rename: a known %v, last error %v", ok, s.LastError())
	}
}

func TestOpenRefusesBadFiles(t *testing.T) {
	dir := t.TempDir()
	if _, err := Open(filepath.Join(dir, "missing"), nil); err == nil {
		t.Error("a missing tokens file was accepted")
	}
	bad := filepath.Join(dir, "bad")
	os.WriteFile(bad, []byte("name=x\n"), 0o600)
	if _, err := Open(bad, nil); err == nil || !strings.Contains(err.Error(), "line 1") {
		t.Errorf("invalid file: %v", err)
	}
}
