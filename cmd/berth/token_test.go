package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/berthd/berth/internal/auth"
)

func runCmd(t *testing.T, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	root := newRootCmd()
	var out, errb bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&errb)
	root.SetArgs(args)
	err = root.Execute()
	return out.String(), errb.String(), err
}

func TestTokenAdd(t *testing.T) {
	file := filepath.Join(t.TempDir(), "tokens")
	out, _, err := runCmd(t, "token", "add", "--file", file, "--role", "submitter", "--tenant", "team-a", "--tenant", "team-b", "--name", "ci")
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSuffix(out, "\n"), "\n")
	if len(lines) != 1 || !strings.HasPrefix(lines[0], auth.TokenPrefix) {
		t.Fatalf("stdout %q: want the token alone on one line", out)
	}
	token := lines[0]
	out2, _, err := runCmd(t, "token", "add", "--file", file, "--role", "reader")
	if err != nil {
		t.Fatal(err)
	}
	data, _ := os.ReadFile(file)
	if strings.Contains(string(data), token) || strings.Contains(string(data), strings.TrimSpace(out2)) {
		t.Fatal("the tokens file holds a token")
	}
	if fi, _ := os.Stat(file); fi.Mode().Perm() != 0o600 {
		t.Errorf("tokens file mode %v, want 0600", fi.Mode().Perm())
	}
	ts, err := auth.Parse(data)
	if err != nil {
		t.Fatal(err)
	}
	id, ok := ts.Lookup(token)
	if !ok || id.Name != "ci" || id.Role != auth.RoleSubmitter || strings.Join(id.Tenants, ",") != "team-a,team-b" {
		t.Fatalf("lookup of the printed token: %+v %v", id, ok)
	}
	if id, ok := ts.Lookup(strings.TrimSpace(out2)); !ok || id.Role != auth.RoleReader || !strings.HasPrefix(id.Name, "reader-") {
		t.Fatalf("second token: %+v %v", id, ok)
	}
	// Refusals write nothing.
	for _, args := range [][]string{
		{"--role", "submitter"},                    // no tenant
		{"--role", "root"},                         // no such role
		{"--role", "admin", "--name", "ci"},        // name taken
		{"--role", "reader", "--tenant", "team-a"}, // tenants are for submitters
		{"--role", "admin", "--name", "has space"}, // bad name
	} {
		before, _ := os.ReadFile(file)
		out, _, err := runCmd(t, append([]string{"token", "add", "--file", file}, args...)...)
		after, _ := os.ReadFile(file)
		if err == nil || out != "" || !bytes.Equal(before, after) {
			t.Errorf("token add %v: err %v, stdout %q, file changed %v", args, err, out, !bytes.Equal(before, after))
		}
	}
}
