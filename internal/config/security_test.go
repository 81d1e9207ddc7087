package config

import (
	"strings"
	"testing"
)

func TestListenersNeedTLSAndTokensOffLoopback(t *testing.T) {
	for _, tc := range []struct {
		name   string
		modify func(*Config)
		want   string // "" for valid
	}{
		{"defaults", func(*Config) {}, ""},
		{"loopback v6", func(c *Config) { c.Listen = "[::1]:7470" }, ""},
		{"localhost", func(c *Config) { c.Listen = "localhost:7470" }, ""},
		{"unix only", func(c *Config) { c.Listen = "" }, ""},
		{"nothing", func(c *Config) { c.Listen, c.ListenUnix = "", "" }, "both empty"},
		{"relative socket", func(c *Config) { c.ListenUnix = "berth.sock" }, "listen_unix"},
		{"all interfaces", func(c *Config) { c.Listen = ":7470" }, "without TLS"},
		{"any v4", func(c *Config) { c.Listen = "0.0.0.0:7470" }, "without TLS"},
		{"a LAN address", func(c *Config) { c.Listen = "10.1.2.3:7470" }, "without TLS"},
		{"a host name", func(c *Config) { c.Listen = "node1.example:7470" }, "without TLS"},
		{"TLS but no tokens", func(c *Config) {
			c.Listen, c.TLS.CertFile, c.TLS.KeyFile = "0.0.0.0:7470", "/c.pem", "/k.pem"
		}, "without authentication"},
		{"TLS and tokens", func(c *Config) {
			c.Listen, c.TLS.CertFile, c.TLS.KeyFile, c.Auth.TokensFile = "0.0.0.0:7470", "/c.pem", "/k.pem", "/tokens"
		}, ""},
		{"cert without key", func(c *Config) { c.TLS.CertFile = "/c.pem" }, "go together"},
		{"client CA without TLS", func(c *Config) { c.TLS.ClientCAFile = "/ca.pem" }, "need TLS"},
		{"client CA without tokens", func(c *Config) {
			c.TLS.CertFile, c.TLS.KeyFile, c.TLS.ClientCAFile = "/c.pem", "/k.pem", "/ca.pem"
		}, "tokens file"},
		{"tiny header limit", func(c *Config) { c.API.MaxHeaderBytes = 100 }, "api.max_header_bytes"},
		{"no header timeout", func(c *Config) { c.API.ReadHeaderTimeout = 0 }, "api.read_header_timeout"},
	} {
		c, err := Load("", nil)
		if err != nil {
			t.Fatal(err)
		}
		tc.modify(c)
		err = c.Validate()
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("%s: %v", tc.name, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("%s: %v, want an error with %q", tc.name, err, tc.want)
		}
	}
}
