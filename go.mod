module github.com/comfygate/comfygate

go 1.26.0

require (
	github.com/coder/websocket v1.8.15
	github.com/google/go-cmp v0.7.0
	github.com/spf13/pflag v1.1.0
	go.uber.org/goleak v1.3.0
)
