package driver

import (
	"github.com/berthd/berth/api/client"
)

// defaultAddress is the agent's default unix socket.
const defaultAddress = "unix:///run/berth/berth.sock"

// newClient returns a berth client for addr (unix:///PATH, HOST:PORT or a
// URL) that sends token, if any, as its bearer credential.
func newClient(addr, token string) (*client.Client, error) {
	if addr == "" {
		addr = defaultAddress
	}
	var opts []client.Option
	if token != "" {
		opts = append(opts, client.WithToken(token))
	}
	return client.New(addr, opts...)
}
