package guest

import (
	"bytes"
	"errors"
	"strings"
	"testing"

	"github.com/berthd/berth/errdefs"
)

func TestConfigRoundTrip(t *testing.T) {
	in := Config{
		Args:     []string{"/bin/sh", "-c", "echo hi"},
		Env:      []string{"FOO=bar", "EMPTY="},
		Workdir:  "/srv",
		User:     "1000:100",
		Hostname: "web-1",
	}
	data, err := EncodeConfig(in)
	if err != nil {
		t.Fatal(err)
	}
	if len(data)%SectorSize != 0 {
		t.Fatalf("encoded size %d is not a multiple of %d", len(data), SectorSize)
	}
	out, err := DecodeConfig(data)
	if err != nil {
		t.Fatal(err)
	}
	if out.Version != ConfigVersion {
		t.Errorf("version = %d, want %d", out.Version, ConfigVersion)
	}
	if strings.Join(out.Args, "|") != strings.Join(in.Args, "|") || strings.Join(out.Env, "|") != strings.Join(in.Env, "|") ||
		out.Workdir != in.Workdir || out.User != in.User || out.Hostname != in.Hostname {
		t.Errorf("round trip: got %+v, want %+v", out, in)
	}
}

func TestEncodeConfigPadsExactly(t *testing.T) {
	data, err := EncodeConfig(Config{Args: []string{"true"}})
	if err != nil {
		t.Fatal(err)
	}
	if len(data) != SectorSize {
		t.Fatalf("small config encodes to %d bytes, want one sector", len(data))
	}
	json := data[:bytes.IndexByte(data, 0)]
	if !bytes.HasPrefix(json, []byte(`{"version":1,`)) {
		t.Errorf("encoded JSON = %s", json)
	}
	if len(bytes.Trim(data[len(json):], "\x00")) != 0 {
		t.Errorf("padding is not all NUL")
	}
}

func TestDecodeConfigWithoutPadding(t *testing.T) {
	c, err := DecodeConfig([]byte(`{"version":1,"args":["ls"]}`))
	if err != nil {
		t.Fatal(err)
	}
	if c.Args[0] != "ls" {
		t.Errorf("args = %q", c.Args)
	}
}

func TestConfigInvalid(t *testing.T) {
	for name, tc := range map[string]struct {
		cfg  Config
		want string
	}{
		"no args":         {Config{}, "a command is required"},
		"empty command":   {Config{Args: []string{""}}, "a command is required"},
		"nul in arg":      {Config{Args: []string{"a\x00b"}}, "NUL"},
		"bad env":         {Config{Args: []string{"x"}, Env: []string{"NOEQUALS"}}, "env[0]"},
		"empty key":       {Config{Args: []string{"x"}, Env: []string{"=v"}}, "env[0]"},
		"relative dir":    {Config{Args: []string{"x"}, Workdir: "srv"}, "workdir"},
		"named user":      {Config{Args: []string{"x"}, User: "nobody"}, "uid must be numeric"},
		"named group":     {Config{Args: []string{"x"}, User: "1:wheel"}, "gid must be numeric"},
		"hostname":        {Config{Args: []string{"x"}, Hostname: "a b"}, "hostname"},
		"future":          {Config{Version: 2, Args: []string{"x"}}, "version 2"},
		"network address": {Config{Args: []string{"x"}, Network: &Network{Interface: "eth0"}}, "network.address"},
		"network gateway": {Config{Args: []string{"x"}, Network: &Network{Address: "10.88.0.2/16", Gateway: "nope"}}, "network.gateway"},
		"network dns":     {Config{Args: []string{"x"}, Network: &Network{Address: "10.88.0.2/16", DNS: []string{"x"}}}, "network.dns[0]"},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := EncodeConfig(tc.cfg)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("EncodeConfig error = %v, want one containing %q", err, tc.want)
			}
			if !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Errorf("error %v is not ErrInvalidArgument", err)
			}
		})
	}
}

func TestDecodeConfigRejects(t *testing.T) {
	for name, data := range map[string]string{
		"empty disk":    "\x00\x00\x00\x00",
		"not json":      "hello\x00",
		"unknown field": `{"version":1,"args":["x"],"mounts":[]}`,
		"trailing":      `{"version":1,"args":["x"]}{"version":1}`,
		"no version":    `{"args":["x"]}`,
		"invalid":       `{"version":1,"args":[]}`,
	} {
		t.Run(name, func(t *testing.T) {
			if _, err := DecodeConfig([]byte(data)); !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Fatalf("DecodeConfig(%q) error = %v, want ErrInvalidArgument", data, err)
			}
		})
	}
}

func TestParseUser(t *testing.T) {
	for _, tc := range []struct {
		in       string
		uid, gid uint32
		hasGID   bool
		ok       bool
	}{
		{"", 0, 0, true, true},
		{"0", 0, 0, false, true},
		{"1000", 1000, 0, false, true},
		{"1000:100", 1000, 100, true, true},
		{"1000:", 0, 0, false, false},
		{"-1", 0, 0, false, false},
		{"4294967296", 0, 0, false, false},
	} {
		uid, gid, hasGID, err := ParseUser(tc.in)
		if (err == nil) != tc.ok {
			t.Errorf("ParseUser(%q) error = %v, want ok=%v", tc.in, err, tc.ok)
			continue
		}
		if tc.ok && (uid != tc.uid || gid != tc.gid || hasGID != tc.hasGID) {
			t.Errorf("ParseUser(%q) = %d, %d, %v; want %d, %d, %v", tc.in, uid, gid, hasGID, tc.uid, tc.gid, tc.hasGID)
		}
	}
}

func FuzzDecodeConfig(f *testing.F) {
	f.Add([]byte(`{"version":1,"args":["sh"],"env":["A=b"]}`))
	f.Add([]byte("\x00"))
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := DecodeConfig(data)
		if err != nil {
			return
		}
		// Whatever decodes must re-encode and decode to the same command.
		enc, err := EncodeConfig(*c)
		if err != nil {
			t.Fatalf("decoded config does not re-encode: %v", err)
		}
		c2, err := DecodeConfig(enc)
		if err != nil || strings.Join(c2.Args, "\x00") != strings.Join(c.Args, "\x00") {
			t.Fatalf("re-decode: %v, %+v vs %+v", err, c2, c)
		}
	})
}

// Stdin and TTY travel only when set: a config without them is what an
// older berth-init reads, and one of an older host reads as neither.
func TestConfigStdinTTYCompatible(t *testing.T) {
	plain, err := EncodeConfig(Config{Args: []string{"true"}})
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(plain, []byte(`"stdin"`)) || bytes.Contains(plain, []byte(`"tty"`)) {
		t.Errorf("a config without stdin or tty names them: %s", bytes.TrimRight(plain, "\x00"))
	}
	c, err := DecodeConfig([]byte(`{"version":1,"args":["sh"],"exec_channel":true}`))
	if err != nil || c.Stdin || c.TTY {
		t.Errorf("an older host's config = %+v, %v; want neither stdin nor tty", c, err)
	}
	data, err := EncodeConfig(Config{Args: []string{"sh"}, Stdin: true, TTY: true})
	if err != nil {
		t.Fatal(err)
	}
	if c, err := DecodeConfig(data); err != nil || !c.Stdin || !c.TTY {
		t.Errorf("round trip of stdin and tty = %+v, %v", c, err)
	}
}
