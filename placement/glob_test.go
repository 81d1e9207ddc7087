package placement

import "testing"

func TestGlob(t *testing.T) {
	tests := []struct {
		pattern, ref string
		want         bool
	}{
		{"docker.io/library/busybox:latest", "docker.io/library/busybox:latest", true},
		{"docker.io/library/busybox:latest", "docker.io/library/busybox:1.36", false},
		{"docker.io/library/*", "docker.io/library/busybox:latest", true},
		{"docker.io/library/*", "docker.io/library/sub/busybox:latest", false},
		{"docker.io/**", "docker.io/library/sub/busybox:latest", true},
		{"*.evil.example/**", "cdn.evil.example/a/b:1", true},
		{"*.evil.example/**", "evil.example/a/b:1", false},
		{"*.evil.example/**", "a.b.evil.example/x:1", true},
		{"docker.io/library/busybox", "docker.io/library/busybox:latest", true},
		{"docker.io/library/busybox", "docker.io/library/busybox@sha256:abcd", true},
		{"docker.io/library/busybox", "docker.io/library/busybox:1@sha256:abcd", true},
		{"docker.io/library/busybox", "docker.io/library/busyboxx:latest", false},
		{"docker.io/library/busybox:*", "docker.io/library/busybox:1.36", true},
		{"docker.io/library/busybox:*", "docker.io/library/busybox@sha256:abcd", false},
		{"localhost:5000/app", "localhost:5000/app:v1", true},
		{"localhost:5000/app", "localhost:5001/app:v1", false},
		{"docker.io/library/busybox:1.3?", "docker.io/library/busybox:1.36", true},
		{"docker.io/library/busybox:1.3?", "docker.io/library/busybox:1.3", false},
		{"docker.io/lib?ary/x:1", "docker.io/lib/ary/x:1", false},
		{"docker.io/[a-c]*/x:1", "docker.io/bob/x:1", true},
		{"docker.io/[a-c]*/x:1", "docker.io/dan/x:1", false},
		{"docker.io/[!a-c]*/x:1", "docker.io/dan/x:1", true},
		{"docker.io/[!a-c]*/x:1", "docker.io/bob/x:1", false},
		{"docker.io/x[!a]y:1", "docker.io/x/y:1", false},
		{"docker.io/[]a]/x:1", "docker.io/]/x:1", true},
		{`docker.io/a\*b:1`, "docker.io/a*b:1", true},
		{`docker.io/a\*b:1`, "docker.io/axb:1", false},
		{"docker.io/a.b:1", "docker.io/aXb:1", false},
		{"docker.io/a+b:1", "docker.io/a+b:1", true},
		{"registry.example.com/**", "registry.example.com.evil/x:1", false},
	}
	for _, tc := range tests {
		g, err := compileGlob(tc.pattern)
		if err != nil {
			t.Errorf("compileGlob(%q): %v", tc.pattern, err)
			continue
		}
		if got := g.match(tc.ref); got != tc.want {
			t.Errorf("%q matching %q = %v, want %v", tc.pattern, tc.ref, got, tc.want)
		}
	}
}

func TestGlobErrors(t *testing.T) {
	for _, p := range []string{"", "a[", "a[b", "a[]", `a\`, `a[\`, "a b", "a\tb", "[z-a]", "\xff", string(make([]byte, maxGlobLen+1))} {
		if _, err := compileGlob(p); err == nil {
			t.Errorf("compileGlob(%q) succeeded", p)
		}
	}
}

func TestRepository(t *testing.T) {
	for ref, want := range map[string]string{
		"docker.io/library/busybox:latest":       "docker.io/library/busybox",
		"localhost:5000/app":                     "localhost:5000/app",
		"localhost:5000/app:1":                   "localhost:5000/app",
		"localhost:5000/app:1@sha256:0123456789": "localhost:5000/app",
		"docker.io/library/busybox@sha256:0123":  "docker.io/library/busybox",
	} {
		if got := repository(ref); got != want {
			t.Errorf("repository(%q) = %q, want %q", ref, got, want)
		}
	}
}

func FuzzGlob(f *testing.F) {
	f.Add("docker.io/**/[a-z]?*", "docker.io/library/busybox:latest")
	f.Add(`*.evil.example/\[x]`, "cdn.evil.example/[x]")
	f.Fuzz(func(t *testing.T, pattern, ref string) {
		g, err := compileGlob(pattern)
		if err != nil {
			return
		}
		// A pattern always matches itself when it has no metacharacters.
		if !containsAny(pattern, `*?[\`) && !g.match(pattern) {
			t.Fatalf("literal %q does not match itself", pattern)
		}
		if g.match(ref) && len(g.prefix) > 0 && ref[:min(len(ref), len(g.prefix))] != g.prefix {
			t.Fatalf("%q matched %q without its literal prefix %q", pattern, ref, g.prefix)
		}
	})
}

func containsAny(s, chars string) bool {
	for i := range len(s) {
		for j := range len(chars) {
			if s[i] == chars[j] {
				return true
			}
		}
	}
	return false
}
