package image

import (
	"fmt"
	"os"

	"github.com/docker/cli/cli/config"
	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

// Credentials are one pull's registry credentials. They print as
// "<redacted>".
type Credentials struct {
	Username, Password, IdentityToken, RegistryToken string
}

func (Credentials) String() string   { return "<redacted>" }
func (Credentials) GoString() string { return "<redacted>" }

// WithAuthFile makes the store take registry credentials from a
// docker-style config.json at path (auths, credsStore and credHelpers:
// docker-credential-* helpers included), read at each pull so a changed
// file applies at once. Without it the store uses the docker config of
// the user running berth (go-containerregistry's default keychain).
func WithAuthFile(path string) Option {
	return func(s *Store) { s.keychain = fileKeychain{path: path} }
}

// authOption is the credentials of one pull: its own, or the store's
// keychain.
func (s *Store) authOption(c *Credentials) remote.Option {
	if c != nil {
		return remote.WithAuth(authn.FromConfig(authn.AuthConfig{
			Username: c.Username, Password: c.Password, IdentityToken: c.IdentityToken, RegistryToken: c.RegistryToken,
		}))
	}
	if s.keychain != nil {
		return remote.WithAuthFromKeychain(s.keychain)
	}
	return remote.WithAuthFromKeychain(authn.DefaultKeychain)
}

// fileKeychain resolves credentials from one docker config file, as the
// docker CLI does for its own (GetAuthConfig runs credential helpers).
type fileKeychain struct{ path string }

func (k fileKeychain) Resolve(target authn.Resource) (authn.Authenticator, error) {
	f, err := os.Open(k.path)
	if err != nil {
		return nil, fmt.Errorf("read the registry credentials file (images.auth_file): %w", err)
	}
	defer f.Close()
	cf, err := config.LoadFromReader(f)
	if err != nil {
		return nil, fmt.Errorf("the registry credentials file (images.auth_file) is not a docker config.json: %w", err)
	}
	cf.Filename = k.path
	for _, key := range []string{target.String(), target.RegistryStr()} {
		if key == name.DefaultRegistry {
			key = authn.DefaultAuthKey
		}
		ac, err := cf.GetAuthConfig(key)
		if err != nil {
			return nil, fmt.Errorf("registry credentials for %s: %w", target.RegistryStr(), err)
		}
		if ac.Username != "" || ac.Password != "" || ac.Auth != "" || ac.IdentityToken != "" || ac.RegistryToken != "" {
			return authn.FromConfig(authn.AuthConfig{
				Username: ac.Username, Password: ac.Password, Auth: ac.Auth,
				IdentityToken: ac.IdentityToken, RegistryToken: ac.RegistryToken,
			}), nil
		}
	}
	return authn.Anonymous, nil
}
