# comfygate: build, test, lint and release.
#
#   make build      ./bin/comfygate for this machine, version from git describe
#   make release    static binaries for Linux, macOS and Windows in dist/, with SHA256SUMS
#   make cross      check that everything builds and vets for Windows, macOS and Linux/arm64
#   make help       every target
#
# VERSION can be overridden: make release VERSION=v1.2.3

ifeq ($(origin VERSION),undefined)
VERSION := $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
endif
GO      ?= go
PKG     := ./cmd/comfygate
LDFLAGS := -X main.version=$(VERSION)

# The os/arch pairs `make release` builds: every platform ComfyUI runs on.
RELEASE_TARGETS := linux/amd64 linux/arm64 darwin/arm64 darwin/amd64 windows/amd64

# The os/arch pairs `make cross` (and CI) check: one per OS other than the
# machine's own linux/amd64.
CROSS_TARGETS := windows/amd64 darwin/arm64 linux/arm64

# staticcheck is run from the Go module proxy at a pinned version, so nothing
# has to be installed first; the first run downloads and compiles it.
STATICCHECK := honnef.co/go/tools/cmd/staticcheck@v0.8.2

.DEFAULT_GOAL := help
.PHONY: help build test race lint vet fmt-check staticcheck cross release image clean

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "  VERSION=$(VERSION)"

build: ## Build ./bin/comfygate with the version stamped in
	$(GO) build -ldflags "$(LDFLAGS)" -o bin/comfygate $(PKG)

test: ## Run the tests (go test ./...)
	$(GO) test ./...

race: ## Run the tests with the race detector, as CI does
	$(GO) test -race -count=1 ./...

lint: vet fmt-check staticcheck ## go vet, gofmt check and staticcheck

vet:
	$(GO) vet ./...

fmt-check:
	@out=$$(gofmt -l $$(find . -name '*.go' -not -path './.git/*')); \
	if [ -n "$$out" ]; then echo "not gofmt-formatted (run gofmt -w):"; echo "$$out"; exit 1; fi

staticcheck:
	$(GO) run $(STATICCHECK) ./...

# go build of several packages compiles them and throws the result away, so
# this writes nothing; go vet catches code that compiles only for some GOOS.
cross: ## go build and go vet ./... for windows/amd64, darwin/arm64 and linux/arm64
	@set -e; for target in $(CROSS_TARGETS); do \
		echo "checking $$target"; \
		GOOS=$${target%/*} GOARCH=$${target#*/} $(GO) build ./...; \
		GOOS=$${target%/*} GOARCH=$${target#*/} $(GO) vet ./...; \
	done

# CGO_ENABLED=0 gives static binaries: on Linux they run on any distribution
# of that architecture, including distroless and scratch images; on macOS and
# Windows they need nothing installed. -trimpath and -s -w drop local paths
# and debug symbols.
release: ## Static binaries for Linux, macOS and Windows in dist/, plus SHA256SUMS
	rm -rf dist
	mkdir -p dist
	@set -e; for target in $(RELEASE_TARGETS); do \
		os=$${target%/*}; arch=$${target#*/}; \
		out=dist/comfygate-$$os-$$arch; \
		if [ $$os = windows ]; then out=$$out.exe; fi; \
		echo "building $$out ($(VERSION))"; \
		CGO_ENABLED=0 GOOS=$$os GOARCH=$$arch $(GO) build -trimpath \
			-ldflags "-s -w $(LDFLAGS)" -o $$out $(PKG); \
	done
	cd dist && sha256sum comfygate-* > SHA256SUMS
	@cat dist/SHA256SUMS

# Needs a Docker engine with BuildKit; not available on every machine.
image: ## Build the container image comfygate:VERSION (needs a Docker engine)
	docker build -f deploy/docker/Dockerfile --build-arg VERSION=$(VERSION) -t comfygate:$(VERSION) .

clean: ## Remove bin/ and dist/
	rm -rf bin dist
