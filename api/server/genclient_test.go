package server_test

import (
	"context"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/getkin/kin-openapi/openapi3"
	"github.com/oapi-codegen/oapi-codegen/v2/pkg/codegen"
	// The generated client's runtime: linking it here keeps it, and the
	// sums of its dependencies, in go.mod and go.sum, so the generated
	// module builds from the module cache alone.
	_ "github.com/oapi-codegen/runtime"
)

// genMain drives the generated client: submit, wait for the end through
// blocking queries on X-Berth-Index, read the logs.
const genMain = `package main

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"time"
)

func main() {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c, err := NewClientWithResponses(os.Args[1])
	if err != nil {
		panic(err)
	}
	cmd := []string{"sh", "-c", "echo hello from a generated client; echo to stderr >&2"}
	created, err := c.CreateWorkloadWithResponse(ctx, CreateWorkloadJSONRequestBody{Image: os.Args[2], Command: &cmd})
	if err != nil {
		panic(err)
	}
	if created.JSON201 == nil {
		panic(fmt.Sprintf("submit: %s %s", created.Status(), created.Body))
	}
	id := created.JSON201.Id
	index := uint64(0)
	for {
		wait := "5s"
		params := &GetWorkloadParams{Wait: &wait}
		if index > 0 {
			params.Index = &index
		}
		got, err := c.GetWorkloadWithResponse(ctx, id, params)
		if err != nil {
			panic(err)
		}
		if got.JSON200 == nil {
			panic(fmt.Sprintf("get: %s %s", got.Status(), got.Body))
		}
		if got.JSON200.State == "failed" {
			panic("the workload failed: " + fmt.Sprint(got.JSON200.Error))
		}
		if got.JSON200.State == "exited" {
			fmt.Printf("exit code %d\n", *got.JSON200.ExitCode)
			break
		}
		if index, err = strconv.ParseUint(got.HTTPResponse.Header.Get("X-Berth-Index"), 10, 64); err != nil {
			panic(err)
		}
	}
	logs, err := c.WorkloadLogsWithResponse(ctx, id, &WorkloadLogsParams{})
	if err != nil {
		panic(err)
	}
	fmt.Printf("status %d\n%s", logs.StatusCode(), logs.Body)
}
`

// TestGeneratedClient generates a Go client from the document the agent
// serves (oapi-codegen, in this process: nothing is fetched), builds it in
// a module of its own from the module cache, and has it submit a workload
// and read its logs from a real agent (fake driver), whose every exchange
// is checked against the document too.
func TestGeneratedClient(t *testing.T) {
	if testing.Short() {
		t.Skip("builds a generated module with the go command")
	}
	e := newEnv(t)
	resp := e.do("GET", "/v1/openapi.json", "", nil)
	doc, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /v1/openapi.json: %v %s", err, resp.Status)
	}
	spec, err := openapi3.NewLoader().LoadFromData(doc)
	if err != nil {
		t.Fatal(err)
	}
	src, err := codegen.Generate(spec, codegen.Configuration{
		PackageName: "main",
		Generate:    codegen.GenerateOptions{Client: true, Models: true},
	})
	if err != nil {
		t.Fatalf("oapi-codegen: %v", err)
	}

	dir := t.TempDir()
	// The runtime's version is berth's own (go.mod), whose module cache
	// and sums the generated module shares.
	mod, err := os.ReadFile(filepath.Join("..", "..", "go.mod"))
	if err != nil {
		t.Fatal(err)
	}
	var rtVersion string
	for _, l := range strings.Split(string(mod), "\n") {
		if f := strings.Fields(l); len(f) >= 2 && f[0] == "github.com/oapi-codegen/runtime" {
			rtVersion = f[1]
		}
	}
	if rtVersion == "" {
		t.Fatal("go.mod does not require github.com/oapi-codegen/runtime")
	}
	sums, err := os.ReadFile(filepath.Join("..", "..", "go.sum"))
	if err != nil {
		t.Fatal(err)
	}
	goVersion := strings.TrimPrefix(strings.Fields(strings.TrimPrefix(runtime.Version(), "go"))[0], "go")
	files := map[string]string{
		"go.mod":    "module berthgen\n\ngo " + goVersion + "\n\nrequire github.com/oapi-codegen/runtime " + rtVersion + "\n",
		"go.sum":    string(sums),
		"client.go": src,
		"main.go":   genMain,
	}
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(runtime.GOROOT(), "bin", "go"), "run", ".", e.srv.URL, testImage)
	cmd.Dir = dir
	// Offline: everything comes from the module cache.
	cmd.Env = append(os.Environ(), "GOFLAGS=-mod=mod -buildvcs=false", "GOPROXY=off", "GOWORK=off", "GOSUMDB=off")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("the generated client: %v\n%s", err, out)
	}
	got := string(out)
	for _, want := range []string{"exit code 0\n", "status 200\n", "hello from a generated client\n", "to stderr\n"} {
		if !strings.Contains(got, want) {
			t.Errorf("the generated client printed %q, want it to contain %q", got, want)
		}
	}
}
