package image

import (
	"regexp"
	"strings"

	"github.com/google/go-containerregistry/pkg/name"

	"github.com/berthd/berth/errdefs"
)

// dockerHub is the registry name Docker shows for Docker Hub; go-containerregistry
// spells it index.docker.io internally.
const dockerHub = "docker.io"

// Normalize returns the canonical form of an image reference, as Docker
// spells it: "busybox" becomes "docker.io/library/busybox:latest",
// "ghcr.io/x/y@sha256:..." stays a digest reference. A tag given together
// with a digest is dropped: the digest alone names the content. An invalid
// reference is an ErrInvalidArgument.
func Normalize(ref string) (string, error) {
	r, err := parse(ref)
	if err != nil {
		return "", err
	}
	return canonical(r), nil
}

func parse(ref string) (name.Reference, error) {
	if strings.TrimSpace(ref) == "" {
		return nil, errdefs.Invalid("ref", "an image reference is required, e.g. docker.io/library/busybox:latest")
	}
	r, err := name.ParseReference(ref)
	if err != nil {
		return nil, errdefs.Invalid("ref", "%q is not a valid image reference (want [registry/]repository[:tag|@sha256:digest], lower case): %v", ref, err)
	}
	// go-containerregistry checks characters only; Docker's grammar also
	// rules out names like "-x/y" or tags like ".v1", which no registry takes.
	for _, c := range strings.Split(r.Context().RepositoryStr(), "/") {
		if !pathComponent.MatchString(c) {
			return nil, errdefs.Invalid("ref", "%q is not a valid image reference: repository path component %q must start and end with a lower-case letter or digit", ref, c)
		}
	}
	if t, ok := r.(name.Tag); ok && !tagPattern.MatchString(t.TagStr()) {
		return nil, errdefs.Invalid("ref", "%q is not a valid image reference: tag %q must start with a letter, digit or underscore", ref, t.TagStr())
	}
	return r, nil
}

// The repository path component and tag grammar of
// github.com/distribution/reference.
var (
	pathComponent = regexp.MustCompile(`^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$`)
	tagPattern    = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$`)
)

func canonical(r name.Reference) string {
	repo := repository(r.Context())
	if d, ok := r.(name.Digest); ok {
		return repo + "@" + d.DigestStr()
	}
	return repo + ":" + r.Identifier()
}

func repository(repo name.Repository) string {
	reg := repo.RegistryStr()
	if reg == name.DefaultRegistry {
		reg = dockerHub
	}
	return reg + "/" + repo.RepositoryStr()
}
