package agent

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"

	bolt "go.etcd.io/bbolt"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/errdefs"
)

func tenantSpec(tenant, name, script string) api.WorkloadSpec {
	spec := sh(script)
	spec.Image, spec.Name = testImage, name
	if tenant != "" {
		spec.Labels = map[string]string{api.TenantLabel: tenant}
	}
	return spec
}

// The leak: tenant a submits x, tenant b submits x. Two
// workloads, and neither submit's answer (nor its error) carries the
// other's id.
func TestNamesAreUniquePerTenant(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	wa := e.submit(tenantSpec("a", "x", "sleep 1000"))
	wb := e.submit(tenantSpec("b", "x", "sleep 1000"))
	if wa.ID == wb.ID {
		t.Fatalf("tenant b's x is tenant a's workload %s", wa.ID)
	}
	if wa.Tenant != "a" || wb.Tenant != "b" {
		t.Errorf("tenants %q and %q, want a and b", wa.Tenant, wb.Tenant)
	}
	// A different spec under b's name is b's conflict, named by b's id.
	spec := tenantSpec("b", "x", "sleep 2000")
	_, _, err := e.agent.Submit(ctx, spec)
	if !errors.Is(err, errdefs.ErrAlreadyExists) || !strings.Contains(err.Error(), wb.ID) || strings.Contains(err.Error(), wa.ID) {
		t.Errorf("b's conflicting resubmit: %v; want ErrAlreadyExists naming %s only", err, wb.ID)
	}
	// Each tenant's retry is its own workload.
	for _, w := range []*api.Workload{wa, wb} {
		got, created, err := e.agent.Submit(ctx, tenantSpec(w.Tenant, "x", "sleep 1000"))
		if err != nil || created || got.ID != w.ID {
			t.Errorf("retry of %s/x: %v created=%v err=%v, want %s", w.Tenant, got, created, err, w.ID)
		}
	}
	// TENANT/NAME finds each; a bare NAME is the node's own namespace,
	// which holds no x yet.
	for ref, want := range map[string]string{"a/x": wa.ID, "b/x": wb.ID, wa.ID: wa.ID} {
		if got, err := e.agent.Get(ctx, ref); err != nil || got.ID != want {
			t.Errorf("Get(%s) = %v, %v; want %s", ref, got, err, want)
		}
	}
	if _, err := e.agent.Get(ctx, "x"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("Get(x) with no untenanted x: %v, want not found", err)
	}
	// The node's namespace is a third one.
	wn := e.submit(tenantSpec("", "x", "sleep 1000"))
	if got, err := e.agent.Get(ctx, "x"); err != nil || got.ID != wn.ID || got.Tenant != "" {
		t.Errorf("Get(x) = %v, %v; want the untenanted %s", got, err, wn.ID)
	}
	if n := len(e.agent.List(ctx, api.ListFilter{})); n != 3 {
		t.Errorf("%d workloads, want 3", n)
	}

	// Names survive a restart in their namespaces, and a delete frees the
	// name in its namespace only.
	e.restart()
	if err := e.agent.Delete(ctx, "a/x", true); err != nil {
		t.Fatal(err)
	}
	if _, err := e.agent.Get(ctx, "a/x"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("a/x after its delete: %v", err)
	}
	for ref, want := range map[string]string{"b/x": wb.ID, "x": wn.ID} {
		if got, err := e.agent.Get(ctx, ref); err != nil || got.ID != want {
			t.Errorf("after a/x's delete, Get(%s) = %v, %v; want %s", ref, got, err, want)
		}
	}
	again := e.submit(tenantSpec("a", "x", "sleep 1000"))
	if again.ID == wa.ID || again.ID == wb.ID || again.ID == wn.ID {
		t.Errorf("a's new x reuses id %s", again.ID)
	}
}

// A name is never an id: a workload named like another's id is found by
// that id as the other workload, and by its name as itself.
func TestNameIsNotAnID(t *testing.T) {
	e := newEnv(t)
	first := e.submit(sh("sleep 1000"))
	named := e.submit(tenantSpec("", first.ID, "sleep 1000"))
	if got, _, err := e.agent.Submit(context.Background(), tenantSpec("", first.ID, "sleep 1000")); err != nil || got.ID != named.ID {
		t.Errorf("retry of the workload named %s: %v %v, want %s", first.ID, got, err, named.ID)
	}
}

// The tenant label names a namespace: it is spelt as tenants are.
func TestTenantLabelIsValidated(t *testing.T) {
	e := newEnv(t)
	for _, tenant := range []string{"A", "a/b", "-a", strings.Repeat("a", 64), "a b"} {
		_, _, err := e.agent.Submit(context.Background(), tenantSpec(tenant, "x", "true"))
		var v *errdefs.ValidationError
		if !errors.As(err, &v) || len(v.Fields) != 1 || v.Fields[0].Field != "labels.tenant" {
			t.Errorf("tenant %q: %v, want a validation error on labels.tenant", tenant, err)
		}
	}
}

// A schema 2 database (names node-wide, no tenant field) is converted:
// each record's tenant is its tenant label, and its name is found in that
// tenant's namespace.
func TestOpenSchema2Database(t *testing.T) {
	dir := t.TempDir()
	st, err := openStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	v2 := map[string]string{
		"00000000000000b1": `{"id":"00000000000000b1","name":"web","spec":{"name":"web","image":"` + testImage + `","command":["sleep","1000"],"labels":{"tenant":"t2"},"resources":{},"restart":{"policy":"never"}},"state":"exited","isolation":"container","exit_code":0,"created_at":"2025-01-02T03:04:05Z","modify_index":3}`,
		"00000000000000b2": `{"id":"00000000000000b2","name":"db","spec":{"name":"db","image":"` + testImage + `","command":["sleep","1000"],"resources":{},"restart":{"policy":"never"}},"state":"exited","isolation":"container","exit_code":0,"created_at":"2025-01-02T03:04:05Z","modify_index":4}`,
	}
	err = st.db.Update(func(tx *bolt.Tx) error {
		for id, rec := range v2 {
			if err := tx.Bucket(bucketWorkloads).Put([]byte(id), []byte(rec)); err != nil {
				return err
			}
		}
		return tx.Bucket(bucketMeta).Put(keySchema, []byte("2"))
	})
	if err != nil {
		t.Fatal(err)
	}
	st.close()
	if st, err = openStore(dir); err != nil {
		t.Fatal(err)
	}
	recs, _, err := st.loadAll()
	if err != nil {
		t.Fatal(err)
	}
	tenants := map[string]string{}
	for _, r := range recs {
		tenants[r.Workload.ID] = r.Workload.Tenant
	}
	if tenants["00000000000000b1"] != "t2" || tenants["00000000000000b2"] != "" || len(tenants) != 2 {
		t.Errorf("tenants after conversion: %v", tenants)
	}
	var raw []byte
	_ = st.db.View(func(tx *bolt.Tx) error {
		raw = append(raw, tx.Bucket(bucketWorkloads).Get([]byte("00000000000000b1"))...)
		return nil
	})
	var d dbRecord
	if err := json.Unmarshal(raw, &d); err != nil || d.Tenant != "t2" {
		t.Errorf("the converted record %s: tenant %q, %v", raw, d.Tenant, err)
	}
	st.close()

	e := newEnv(t)
	e.agent.Close()
	e.agent, e.dir = nil, dir
	e.start()
	ctx := context.Background()
	for ref, want := range map[string]string{"t2/web": "00000000000000b1", "db": "00000000000000b2"} {
		if got, err := e.agent.Get(ctx, ref); err != nil || got.ID != want {
			t.Errorf("Get(%s) = %v, %v; want %s", ref, got, err, want)
		}
	}
	if _, err := e.agent.Get(ctx, "web"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("the tenant's web by its bare name: %v, want not found", err)
	}
}
