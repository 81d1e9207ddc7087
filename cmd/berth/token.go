package main

import (
	"bytes"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"os"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/berthd/berth/api/client"
	"github.com/berthd/berth/internal/auth"
)

// addSecurityFlags adds the client's credentials and TLS trust.
func (g *globals) addSecurityFlags(root *cobra.Command) {
	f := root.PersistentFlags()
	f.StringVar(&g.token, "token", os.Getenv("BERTH_TOKEN"), "bearer token for an agent with auth on (env BERTH_TOKEN, which keeps it out of ps)")
	f.StringVar(&g.tlsCA, "tls-ca", os.Getenv("BERTH_TLS_CA"), "CA certificate (PEM) to verify the agent's TLS certificate; turns TLS on for HOST:PORT (env BERTH_TLS_CA)")
	f.StringVar(&g.tlsCert, "tls-cert", os.Getenv("BERTH_TLS_CERT"), "client certificate (PEM) for mTLS (env BERTH_TLS_CERT)")
	f.StringVar(&g.tlsKey, "tls-key", os.Getenv("BERTH_TLS_KEY"), "client certificate's key (PEM) (env BERTH_TLS_KEY)")
}

func (g *globals) clientOptions() ([]client.Option, error) {
	var opts []client.Option
	if g.token != "" {
		opts = append(opts, client.WithToken(g.token))
	}
	if g.tlsCA == "" && g.tlsCert == "" {
		return opts, nil
	}
	conf := &tls.Config{MinVersion: tls.VersionTLS12}
	if g.tlsCA != "" {
		pem, err := os.ReadFile(g.tlsCA)
		if err != nil {
			return nil, fmt.Errorf("--tls-ca: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("--tls-ca %s: no PEM certificate in it", g.tlsCA)
		}
		conf.RootCAs = pool
	}
	if (g.tlsCert == "") != (g.tlsKey == "") {
		return nil, errors.New("--tls-cert and --tls-key go together")
	}
	if g.tlsCert != "" {
		cert, err := tls.LoadX509KeyPair(g.tlsCert, g.tlsKey)
		if err != nil {
			return nil, fmt.Errorf("--tls-cert/--tls-key: %w", err)
		}
		conf.Certificates = []tls.Certificate{cert}
	}
	return append(opts, client.WithTLS(conf)), nil
}

func newTokenCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "token",
		Short: "Manage the agent's tokens file",
	}
	var (
		file, role, name string
		tenants          []string
	)
	add := &cobra.Command{
		Use:   "add --file FILE --role ROLE [--tenant T]... [--name NAME]",
		Short: "Make a new token: append its hash to the tokens file and print the token once",
		Long: `Make a new bearer token for a berth agent.

The token is printed once on stdout, alone on its line; the tokens file keeps
only its SHA-256. The running agent picks the new entry up by itself.

Roles: admin (everything), operator (policy, node, images, events, metrics,
read all workloads), submitter (create, read, stop and delete the workloads
of its tenants; needs --tenant), reader (node status, events, metrics).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if name == "" {
				var b [4]byte
				if _, err := rand.Read(b[:]); err != nil {
					return err
				}
				name = fmt.Sprintf("%s-%x", role, b)
			}
			token, line, err := auth.NewToken(name, auth.Role(role), tenants)
			if err != nil {
				return fmt.Errorf("token: %w", err)
			}
			if err := appendEntry(file, line); err != nil {
				return err
			}
			fmt.Fprintf(cmd.ErrOrStderr(), "added %q (%s) to %s; the token is shown only now:\n", name, role, file)
			fmt.Fprintln(cmd.OutOrStdout(), token)
			return nil
		},
	}
	f := add.Flags()
	f.StringVar(&file, "file", "", "tokens file (created with mode 0600 when missing)")
	f.StringVar(&role, "role", "", "admin, operator, submitter or reader")
	f.StringArrayVar(&tenants, "tenant", nil, "a tenant the submitter may act for (repeatable)")
	f.StringVar(&name, "name", "", "entry name, shown in the audit log (default ROLE-RANDOM)")
	_ = add.MarkFlagRequired("file")
	_ = add.MarkFlagRequired("role")
	cmd.AddCommand(add)
	return cmd
}

// appendEntry adds line to the tokens file under an exclusive lock, after
// checking that the file with the line still parses (a duplicate name is
// refused before anything is written).
func appendEntry(file, line string) error {
	f, err := os.OpenFile(file, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		return fmt.Errorf("lock %s: %w", file, err)
	}
	data, err := io.ReadAll(io.LimitReader(f, auth.MaxFileSize+1))
	if err != nil {
		return err
	}
	if len(data) > 0 && !bytes.HasSuffix(data, []byte("\n")) {
		line = "\n" + line
	}
	if len(data) == 0 {
		line = "# berth tokens file: see berth token add --help. Only hashes are kept here.\n" + line
	}
	next := append(append([]byte{}, data...), line+"\n"...)
	if _, err := auth.Parse(next); err != nil {
		return fmt.Errorf("tokens file %s: %w", file, err)
	}
	if _, err := f.Seek(0, io.SeekEnd); err != nil {
		return err
	}
	if _, err := f.WriteString(line + "\n"); err != nil {
		return err
	}
	return f.Sync()
}
