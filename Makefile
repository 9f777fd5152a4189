# comfygate: build, test, lint and release.
#
#   make build      ./bin/comfygate for this machine, version from git describe
#   make release    static linux/amd64 and linux/arm64 binaries in dist/, with SHA256SUMS
#   make help       every target
#
# VERSION can be overridden: make release VERSION=v1.2.3

ifeq ($(origin VERSION),undefined)
VERSION := $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
endif
GO      ?= go
PKG     := ./cmd/comfygate
LDFLAGS := -X main.version=$(VERSION)

# The architectures `make release` builds, all for linux.
RELEASE_ARCHES := amd64 arm64

# staticcheck is run from the Go module proxy at a pinned version, so nothing
# has to be installed first; the first run downloads and compiles it.
STATICCHECK := honnef.co/go/tools/cmd/staticcheck@v0.8.2

.DEFAULT_GOAL := help
.PHONY: help build test race lint vet fmt-check staticcheck release image clean

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

# CGO_ENABLED=0 gives static binaries that run on any Linux of that
# architecture, including distroless and scratch images. -trimpath and
# -s -w drop local paths and debug symbols.
release: ## Static binaries for linux/amd64 and linux/arm64 in dist/, plus SHA256SUMS
	rm -rf dist
	mkdir -p dist
	@set -e; for arch in $(RELEASE_ARCHES); do \
		echo "building dist/comfygate-linux-$$arch ($(VERSION))"; \
		CGO_ENABLED=0 GOOS=linux GOARCH=$$arch $(GO) build -trimpath \
			-ldflags "-s -w $(LDFLAGS)" -o dist/comfygate-linux-$$arch $(PKG); \
	done
	cd dist && sha256sum comfygate-linux-* > SHA256SUMS
	@cat dist/SHA256SUMS

# Needs a Docker engine with BuildKit; not available on every machine.
image: ## Build the container image comfygate:VERSION (needs a Docker engine)
	docker build -f deploy/docker/Dockerfile --build-arg VERSION=$(VERSION) -t comfygate:$(VERSION) .

clean: ## Remove bin/ and dist/
	rm -rf bin dist
