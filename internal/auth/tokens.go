package auth

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strings"
)

// The tokens file holds one entry per line; '#' starts a comment line:
//
//	name=ci-runner role=submitter tenants=team-a,team-b sha256=<hex>
//	name=fleet role=reader sha256=<hex>
//	name=ops-laptop role=operator cert=cn:ops-1
//	name=deployer role=admin cert=uri:spiffe://example.org/deployer
//
// sha256 is the hex SHA-256 of the bearer token (berth token add writes
// it; the token itself is never stored). cert maps a verified client
// certificate to the entry, by its subject common name (cn:NAME) or one of
// its URI subject alternative names (uri:URI). An entry has exactly one of
// sha256 and cert. Names are unique; submitters need at least one tenant,
// other roles have none.

// Limits of the tokens file.
const (
	MaxFileSize  = 1 << 20
	maxEntries   = 10000
	maxTenants   = 256
	maxNameLen   = 128
	maxTenantLen = 63
	maxCertLen   = 1024
)

var (
	nameRE   = regexp.MustCompile(`^[A-Za-z0-9]([-A-Za-z0-9_.@]*[A-Za-z0-9])?$`)
	tenantRE = regexp.MustCompile(`^[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$`)
)

// Entry is one line of the tokens file.
type Entry struct {
	Name    string
	Role    Role
	Tenants []string
	// Hash is the SHA-256 of the token; zero for a certificate entry.
	Hash [sha256.Size]byte
	// Cert is "cn:NAME" or "uri:URI"; empty for a token entry.
	Cert string
	Line int
}

// Tokens is a parsed tokens file. It is never changed once parsed.
type Tokens struct {
	entries []Entry
}

// Entries returns a copy of the entries, in file order.
func (t *Tokens) Entries() []Entry { return slices.Clone(t.entries) }

// LineError is a problem on one line of the tokens file.
type LineError struct {
	Line int
	Msg  string
}

func (e *LineError) Error() string { return fmt.Sprintf("line %d: %s", e.Line, e.Msg) }

// Parse reads a tokens file. Every bad line is reported (errors.Join of
// *LineError), none of the file is used then.
func Parse(data []byte) (*Tokens, error) {
	if len(data) > MaxFileSize {
		return nil, fmt.Errorf("tokens file is %d bytes, more than the %d allowed", len(data), MaxFileSize)
	}
	t := &Tokens{}
	var errs []error
	names := map[string]int{}
	creds := map[string]int{}
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 0, 4096), MaxFileSize)
	line := 0
	for sc.Scan() {
		line++
		text := strings.TrimSpace(sc.Text())
		if text == "" || strings.HasPrefix(text, "#") {
			continue
		}
		if len(t.entries) >= maxEntries {
			errs = append(errs, &LineError{line, fmt.Sprintf("more than %d entries", maxEntries)})
			break
		}
		e, lineErrs := parseLine(text)
		for _, msg := range lineErrs {
			errs = append(errs, &LineError{line, msg})
		}
		if len(lineErrs) > 0 {
			continue
		}
		e.Line = line
		if first, dup := names[e.Name]; dup {
			errs = append(errs, &LineError{line, fmt.Sprintf("name %q is already used on line %d", e.Name, first)})
			continue
		}
		cred := e.Cert
		if cred == "" {
			cred = hex.EncodeToString(e.Hash[:])
		}
		if first, dup := creds[cred]; dup {
			errs = append(errs, &LineError{line, fmt.Sprintf("the same credential is already on line %d", first)})
			continue
		}
		names[e.Name], creds[cred] = line, line
		t.entries = append(t.entries, e)
	}
	if err := sc.Err(); err != nil {
		errs = append(errs, fmt.Errorf("line %d: %w", line+1, err))
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return t, nil
}

func parseLine(text string) (Entry, []string) {
	var (
		e    Entry
		errs []string
		seen = map[string]bool{}
		hash string
	)
	for _, field := range strings.Fields(text) {
		k, v, ok := strings.Cut(field, "=")
		if !ok || k == "" {
			errs = append(errs, fmt.Sprintf("%q is not KEY=VALUE", clip(field)))
			continue
		}
		if seen[k] {
			errs = append(errs, fmt.Sprintf("%s is given twice", clip(k)))
			continue
		}
		seen[k] = true
		switch k {
		case "name":
			if len(v) > maxNameLen || !nameRE.MatchString(v) {
				errs = append(errs, fmt.Sprintf("name %q: letters, digits and -_.@, at most %d characters, starting and ending with a letter or digit", clip(v), maxNameLen))
			}
			e.Name = v
		case "role":
			e.Role = Role(v)
			if !e.Role.Valid() {
				errs = append(errs, fmt.Sprintf("role %q is not admin, operator, submitter or reader", clip(v)))
			}
		case "tenants":
			for _, tn := range strings.Split(v, ",") {
				if len(tn) > maxTenantLen || !tenantRE.MatchString(tn) {
					errs = append(errs, fmt.Sprintf("tenant %q: lower-case letters, digits and -_., at most %d characters", clip(tn), maxTenantLen))
					continue
				}
				if slices.Contains(e.Tenants, tn) {
					errs = append(errs, fmt.Sprintf("tenant %q is listed twice", tn))
					continue
				}
				e.Tenants = append(e.Tenants, tn)
			}
			if len(e.Tenants) > maxTenants {
				errs = append(errs, fmt.Sprintf("more than %d tenants", maxTenants))
			}
		case "sha256":
			hash = v
			b, err := hex.DecodeString(v)
			if err != nil || len(b) != sha256.Size {
				errs = append(errs, "sha256 must be 64 hex digits: the SHA-256 of the token (berth token add writes it)")
				continue
			}
			copy(e.Hash[:], b)
		case "cert":
			kind, id, _ := strings.Cut(v, ":")
			if (kind != "cn" && kind != "uri") || id == "" || len(v) > maxCertLen {
				errs = append(errs, fmt.Sprintf("cert %q: want cn:COMMON-NAME or uri:URI-SAN", clip(v)))
			}
			e.Cert = v
		default:
			errs = append(errs, fmt.Sprintf("unknown key %q (known: name, role, tenants, sha256, cert)", clip(k)))
		}
	}
	if !seen["name"] {
		errs = append(errs, "name is missing")
	}
	if !seen["role"] {
		errs = append(errs, "role is missing")
	}
	if seen["sha256"] == seen["cert"] {
		errs = append(errs, "give exactly one of sha256 (a token) and cert (a client certificate)")
	}
	if e.Role == RoleSubmitter && len(e.Tenants) == 0 && !seen["tenants"] {
		errs = append(errs, "a submitter needs tenants=T[,T...]")
	}
	if e.Role != RoleSubmitter && seen["tenants"] && e.Role.Valid() {
		errs = append(errs, fmt.Sprintf("tenants apply to submitters only; role %s sees every tenant", e.Role))
	}
	if hash == "" {
		e.Hash = [sha256.Size]byte{}
	}
	return e, errs
}

// clip keeps error messages short when a line is garbage.
func clip(s string) string {
	if len(s) > 64 {
		return s[:64] + "..."
	}
	return s
}

// Lookup returns the identity a bearer token belongs to. It compares the
// token's hash with every entry in constant time and never stops early,
// so timing tells nothing about which entry (if any) matched.
func (t *Tokens) Lookup(token string) (*Identity, bool) {
	if t == nil || token == "" {
		return nil, false
	}
	sum := sha256.Sum256([]byte(token))
	var found *Entry
	for i := range t.entries {
		e := &t.entries[i]
		if e.Cert != "" {
			continue
		}
		if subtle.ConstantTimeCompare(sum[:], e.Hash[:]) == 1 {
			found = e
		}
	}
	if found == nil {
		return nil, false
	}
	return found.identity(ViaToken), true
}

// LookupCert returns the identity a verified client certificate maps to:
// the first entry whose cert is cn:<subject CN> or uri:<one of its URI
// SANs>.
func (t *Tokens) LookupCert(cert *x509.Certificate) (*Identity, bool) {
	if t == nil || cert == nil {
		return nil, false
	}
	ids := CertIdentities(cert)
	for i := range t.entries {
		e := &t.entries[i]
		if e.Cert != "" && slices.Contains(ids, e.Cert) {
			return e.identity(ViaClientCert), true
		}
	}
	return nil, false
}

// CertIdentities are the names a certificate can be mapped by: cn:CN (when
// it has one) and uri:URI for each URI SAN.
func CertIdentities(cert *x509.Certificate) []string {
	var ids []string
	if cn := cert.Subject.CommonName; cn != "" {
		ids = append(ids, "cn:"+cn)
	}
	for _, u := range cert.URIs {
		ids = append(ids, "uri:"+u.String())
	}
	return ids
}

func (e *Entry) identity(via Via) *Identity {
	return &Identity{Name: e.Name, Role: e.Role, Tenants: slices.Clone(e.Tenants), Via: via}
}

// TokenPrefix starts every token berth makes, so secret scanners can find
// them.
const TokenPrefix = "berth_"

// NewToken returns a fresh token (256 random bits) and the tokens-file
// line for it. The token is shown once; only its hash is kept.
func NewToken(name string, role Role, tenants []string) (token, line string, err error) {
	var b [32]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", "", err
	}
	token = TokenPrefix + base64.RawURLEncoding.EncodeToString(b[:])
	sum := sha256.Sum256([]byte(token))
	line = fmt.Sprintf("name=%s role=%s", name, role)
	if len(tenants) > 0 {
		line += " tenants=" + strings.Join(tenants, ",")
	}
	line += " sha256=" + hex.EncodeToString(sum[:])
	// The line must parse on its own, so a bad name or tenant is refused
	// before anything is written.
	if _, err := Parse([]byte(line)); err != nil {
		return "", "", err
	}
	return token, line, nil
}
