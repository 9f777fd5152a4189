package proxy

import (
	"net/url"
	"testing"

	"go.uber.org/goleak"

	"github.com/comfygate/comfygate/internal/upstream"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// poolOf is a pool of one server at base (http://host:port).
func poolOf(tb testing.TB, base string, opts ...upstream.Options) *upstream.Pool {
	tb.Helper()
	u, err := url.Parse(base)
	if err != nil {
		tb.Fatal(err)
	}
	var o upstream.Options
	if len(opts) > 0 {
		o = opts[0]
	}
	p, err := upstream.NewPool([]upstream.Spec{{URL: u}}, o)
	if err != nil {
		tb.Fatal(err)
	}
	return p
}
