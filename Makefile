# nlvpn developer targets. The namespace tests, demo and bench need root.
# Go from its usual place on a fresh machine, if it is not on PATH already.
export PATH := $(PATH):/usr/local/go/bin
GO      ?= go
BIN     := bin
# Every package except the end-to-end suite, which runs separately.
UNIT_PKGS = $(shell $(GO) list ./... | grep -v '/e2e$$')
# The tests our gVisor and quic-go patches add (third_party/*-patches).
PATCH_TEST_PKGS = gvisor.dev/gvisor/pkg/tcpip/transport/tcp github.com/quic-go/quic-go/internal/ackhandler

.PHONY: all build deps demo test fmt-check tidy-check vet vet-cross third-party-check units-check unit e2e bench wireguard-go fuzz release clean

all: build

# nlvpn version names the commit where git can tell it (not through the
# toolchain's VCS stamping, which fails the build on a checkout git will
# not read, e.g. one owned by another user).
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
# nlvpn without cgo, as release builds it: the bench then measures what
# ships (a cgo build also maps libc, ~1.5 MiB more resident per process).
build:
	CGO_ENABLED=0 $(GO) build -ldflags "-X main.version=$(VERSION)" -o $(BIN)/nlvpn ./cmd/nlvpn
	$(GO) build -o $(BIN)/nlvpn-lab ./cmd/nlvpn-lab

# System tools (iproute2, nftables, curl, iperf3, tcpdump, ping, gcc):
# installs the missing ones with apt-get, or says which are missing.
deps:
	@scripts/deps.sh

demo: deps build
	$(BIN)/nlvpn-lab demo --nlvpn $(BIN)/nlvpn

test: deps fmt-check tidy-check vet vet-cross third-party-check units-check unit e2e

fmt-check:
	@out="$$(gofmt -l .)"; \
	if [ -n "$$out" ]; then echo "gofmt needed on:"; echo "$$out"; exit 1; fi

# go.mod and go.sum say exactly what the code needs.
tidy-check:
	@$(GO) mod tidy -diff || { echo "go.mod/go.sum are not tidy: run go mod tidy"; exit 1; }

vet:
	$(GO) vet ./...

# The release targets: go vet for each, so nothing Linux-only leaks into
# shared code (the lab, the e2e suite and nlvpn-lab are Linux-only).
RELEASE_TARGETS := linux/amd64 linux/arm64 darwin/amd64 darwin/arm64 windows/amd64 windows/arm64
vet-cross:
	@for t in $(RELEASE_TARGETS); do \
		echo "go vet ($$t)"; \
		CGO_ENABLED=0 GOOS=$${t%/*} GOARCH=$${t#*/} $(GO) vet ./... || exit 1; \
	done

# Static binaries for every release target in dist/, with SHA256SUMS.
release:
	@rm -rf dist && mkdir -p dist
	@for t in $(RELEASE_TARGETS); do \
		os=$${t%/*}; arch=$${t#*/}; ext=; [ $$os = windows ] && ext=.exe; \
		echo "building dist/nlvpn-$$os-$$arch$$ext"; \
		CGO_ENABLED=0 GOOS=$$os GOARCH=$$arch $(GO) build -trimpath -ldflags "-s -w -X main.version=$(VERSION)" \
			-o dist/nlvpn-$$os-$$arch$$ext ./cmd/nlvpn || exit 1; \
	done
	cd dist && sha256sum nlvpn-* > SHA256SUMS && cat SHA256SUMS

# third_party/quic-go and third_party/gvisor must be exactly the released
# modules plus our patches, and quic-go's own tests of the packages we build
# must pass on the patched release (about 30 s with -race).
third-party-check:
	scripts/quic-go.sh --check
	scripts/gvisor.sh --check
	scripts/quic-go.sh --upstream-tests -race

# The systemd units in packaging/systemd: systemd-analyze verify with no
# warning, and each unit's exposure score (about a second).
units-check:
	scripts/units-check.sh

unit:
	$(GO) test -race -count=1 $(UNIT_PKGS) $(PATCH_TEST_PKGS)

e2e:
	$(GO) test -count=1 -timeout 15m -v ./e2e/

# The namespace bench (nlvpn next to wireguard-go and the raw path), then
# the Go benchmarks of every package that has any (BenchmarkGatewayIdleNodes,
# 10,000 nodes, takes about 6 minutes; NLVPN_BENCH_NODES=N for fewer).
# Each row of the main table is the median of BENCHREPEAT runs per path:
# on a shared 2-CPU machine one run of a row moves by up to a third, which
# is more than the margins the targets are judged by (BENCHREPEAT=1 for a
# quick look, about a third of the time).
BENCHTIME ?= 5
BENCHREPEAT ?= 3
bench: deps build wireguard-go
	$(BIN)/nlvpn-lab bench --nlvpn $(BIN)/nlvpn --wireguard-go $(BIN)/wireguard-go --time $(BENCHTIME) --repeat $(BENCHREPEAT)
	@echo; echo "==> cone NAT (agent) <-> symmetric NAT (client): the relayed tunnel, and the time to the direct path (the wide round)"
	$(BIN)/nlvpn-lab bench --nlvpn $(BIN)/nlvpn --client-nat symmetric --paths relay --time 2 --trials 10
	$(GO) test -run '^$$' -bench . -benchmem -timeout 30m $(BENCH_PKGS)
	@# Several gateways: the cluster e2e test prints the time to first packet
	@# across gateways and the failover time after the agent's gateway dies.
	$(GO) test -count=1 -run '^TestClusterClientFollowsAgent$$' -v ./e2e/ > $(BIN)/bench-cluster.log 2>&1 || { cat $(BIN)/bench-cluster.log; exit 1; }
	@grep -E 'time to first packet|failover:' $(BIN)/bench-cluster.log

# Packages of this module with a Benchmark function in a test file.
BENCH_PKGS = $(shell $(GO) list -f '{{$$d := .Dir}}{{range .TestGoFiles}}{{$$d}}/{{.}} {{end}}{{range .XTestGoFiles}}{{$$d}}/{{.}} {{end}}' ./... \
	| xargs -r grep -l '^func Benchmark' | xargs -r -n1 dirname | sort -u)

# The bench's baseline, from the module's tool directive (go.mod), so the
# version is the one go.sum pins.
wireguard-go:
	$(GO) build -o $(BIN)/wireguard-go golang.zx2c4.com/wireguard

# Short fuzz runs of every Fuzz target (FUZZTIME per target).
FUZZTIME ?= 10s
fuzz:
	@set -e; for pkg in $(UNIT_PKGS); do \
		for f in $$($(GO) test -list '^Fuzz' $$pkg | grep '^Fuzz' || true); do \
			echo "== $$pkg $$f"; \
			$(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZTIME) $$pkg; \
		done; \
	done

clean:
	rm -rf $(BIN) dist
