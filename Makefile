# berth: `make run` starts an agent in the foreground, `make test` runs
# every test. Both install what is missing first (Debian packages, Go
# modules) and start libvirt's daemons when systemd does not.

GO       ?= go
VERSION  ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS  := -X main.version=$(VERSION)
DATA_DIR ?= /var/lib/berth
# Running containers' runtime files: a tmpfs on a node (/run).
STATE_DIR ?= /run/berth
LISTEN   ?= 127.0.0.1:7470
DEMO_IMAGE := bin/busybox.tar
# Tests that boot VMs and run containers take a while on 2 cores.
TEST_TIMEOUT ?= 60m

# `make deb` builds the Debian packages into bin/deb; `make test` builds and
# checks them too (deploy/deb).
.PHONY: all deps build deb run test test-nomad test-short bench lint fmt clean demo-image nomad

all: build

deps:
	@./hack/deps.sh
	@$(GO) mod download

# libvirt_dlopen: the agent loads libvirt.so.0 at run time instead of
# linking it, so the same binary is a CLI on machines without libvirt (its
# VM driver then reports unhealthy) and needs no libvirt-dev to build.
bin/berth: FORCE
	$(GO) build -tags libvirt_dlopen -ldflags "$(LDFLAGS)" -o $@ ./cmd/berth

# berth-init is PID 1 inside workload VMs: static, no cgo.
bin/berth-init: FORCE
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "-s -w" -o $@ ./cmd/berth-init

# berth-monitor is the per-task monitor, one per running workload: static,
# no cgo, nothing but the standard library and x/sys, so it stays small.
bin/berth-monitor: FORCE
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "-s -w" -o $@ ./cmd/berth-monitor

# berth-entry starts every container process: it installs the seccomp
# filter the agent compiled once (runc would compile it on every start) and
# executes the workload. Freestanding C, no C library: a few KiB.
bin/berth-entry: cmd/berth-entry/entry.c cmd/berth-entry/build.sh
	./cmd/berth-entry/build.sh $@

build: bin/berth bin/berth-init bin/berth-monitor bin/berth-entry

# berth (the node: agent, monitor, guest init, systemd unit, /etc/berth)
# and berth-client (the CLI alone), with nfpm (deploy/deb).
deb: build
	$(GO) run ./deploy/deb/mkdeb -bin bin -src . -out bin/deb -version $(VERSION)

# A busybox image built on this machine from Debian's busybox-static: the
# quickstart needs no registry and no internet.
$(DEMO_IMAGE): /bin/busybox
	$(GO) run ./hack/mkimage -o $@

demo-image: $(DEMO_IMAGE)

run: deps build demo-image
	@echo "berth: agent on $(LISTEN), data in $(DATA_DIR); in another terminal:"
	@echo "  bin/berth image import $(DEMO_IMAGE)"
	@echo "  bin/berth run --wait berth.local/demo/busybox -- sh -c 'echo hello from berth; exit 7'"
	./bin/berth agent --listen $(LISTEN) --data-dir $(DATA_DIR) --state-dir $(STATE_DIR)

test: deps build
	$(GO) vet ./...
	$(GO) test -count=1 -timeout $(TEST_TIMEOUT) ./...
	$(MAKE) test-nomad

# The Nomad task driver against a real Nomad cluster on loopback (builds a
# pinned Nomad first; cached in $(NOMAD_CACHE)).
test-nomad: deps build nomad
	cd integrations/nomad && $(GO) vet ./... && BERTH_NOMAD_BIN=$(NOMAD_BIN) $(GO) test -count=1 -timeout 20m ./...

# Unit tests only: no root, runc or libvirt needed.
test-short:
	$(GO) test -short -count=1 ./...

# berth against raw runc, QEMU and libvirt, side by side in one run on a
# scratch agent; writes bench/results/latest.{md,json}. BENCH_QUICK=1 for a
# short run, BENCH_ACCEL=kvm where KVM guests work (default tcg).
bench: deps build
	$(GO) build -o bin/berth-bench ./bench/cmd/berth-bench
	./bin/berth-bench -berth bin/berth -out bench/results
	# exec round trip into a VM (TCG) next to a bare exec-channel round trip
	$(GO) test -run '^$$' -bench 'VMExec' -benchtime 30x ./vmdriver/ > bench/results/vm-exec.txt; \
		status=$$?; cat bench/results/vm-exec.txt; exit $$status

fmt:
	gofmt -w $$(git ls-files '*.go')

lint:
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); exit 1; }
	$(GO) vet ./...

# The Nomad task driver (its own module) and, for its cluster test, a
# pinned Nomad built from the module proxy, cached across runs.
NOMAD_VERSION ?= 1.11.2
NOMAD_CACHE   ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/berth-nomad
NOMAD_BIN     := $(NOMAD_CACHE)/bin/nomad-$(NOMAD_VERSION)

nomad:
	cd integrations/nomad && $(GO) build -o ../../bin/nomad-driver-berth .
	GO=$(GO) NOMAD_VERSION=$(NOMAD_VERSION) ./integrations/nomad/scripts/build-nomad.sh $(NOMAD_CACHE)

clean:
	rm -rf bin/

FORCE:
