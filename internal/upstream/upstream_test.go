package upstream

import (
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func mustURL(t *testing.T, s string) *url.URL {
	t.Helper()
	u, err := url.Parse(s)
	if err != nil {
		t.Fatal(err)
	}
	return u
}

// deadURL is an http:// URL on a loopback port that refuses connections.
func deadURL(t *testing.T) *url.URL {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return mustURL(t, "http://"+addr)
}

func get(t *testing.T, u *Upstream, path string) (*http.Response, error) {
	t.Helper()
	req, err := http.NewRequestWithContext(t.Context(), "GET", u.URL.String()+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	res, err := u.RoundTrip(req)
	if err == nil {
		io.Copy(io.Discard, res.Body)
		res.Body.Close()
	}
	return res, err
}

// TestPassiveHealth pins that a server that refuses connections is marked
// down by the failed exchange itself, and up again by the next one that
// succeeds; a dial error is the one failure that may be retried anywhere.
func TestPassiveHealth(t *testing.T) {
	u := New("dead", deadURL(t), Options{})
	defer u.CloseIdleConnections()
	if !u.Healthy() {
		t.Fatal("a new upstream starts healthy")
	}
	_, err := get(t, u, "/queue")
	if err == nil || !IsDialError(err) {
		t.Fatalf("err %v; want a dial error", err)
	}
	if u.Healthy() {
		t.Error("a refused connection did not mark the server down")
	}

	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	defer srv.Close()
	u2 := New("", mustURL(t, srv.URL), Options{})
	defer u2.CloseIdleConnections()
	u2.SetHealthy(false)
	if _, err := get(t, u2, "/queue"); err != nil {
		t.Fatal(err)
	}
	if !u2.Healthy() {
		t.Error("an answer did not mark the server up")
	}
	if u2.Name != srv.Listener.Addr().String() {
		t.Errorf("default name %q; want the URL's host", u2.Name)
	}
	if IsDialError(errors.New("EOF")) {
		t.Error("IsDialError: true for an error after connecting")
	}
}

func TestPick(t *testing.T) {
	one, err := NewPool([]Spec{{Name: "a", URL: deadURL(t)}}, Options{})
	if err != nil {
		t.Fatal(err)
	}
	one.All()[0].SetHealthy(false)
	if u, err := one.Pick(); err != nil || u.Name != "a" {
		t.Errorf("single server mode: Pick = %v, %v; want the one server even when down", u, err)
	}

	three, err := NewPool([]Spec{{Name: "a", URL: deadURL(t)}, {Name: "b", URL: deadURL(t)}, {Name: "c", URL: deadURL(t)}}, Options{})
	if err != nil {
		t.Fatal(err)
	}
	three.All()[0].SetHealthy(false)
	if u, _ := three.Pick(); u == nil || u.Name != "b" {
		t.Errorf("Pick = %v; want b, the first healthy server", u)
	}
	for _, u := range three.All() {
		u.SetHealthy(false)
	}
	if _, err := three.Pick(); !errors.Is(err, ErrNoUpstream) {
		t.Errorf("Pick with every server down: %v; want ErrNoUpstream", err)
	}

	if _, err := NewPool([]Spec{{Name: "a", URL: deadURL(t)}, {Name: "a", URL: deadURL(t)}}, Options{}); err == nil {
		t.Error("NewPool accepted a name used twice")
	}
	if _, err := NewPool(nil, Options{}); err == nil {
		t.Error("NewPool accepted no servers")
	}
}

// TestIdleConnectionsClosedOnTime pins that an idle connection to ComfyUI is
// closed by the gateway when its idle time is up, without waiting for a
// next request to find it stale. aiohttp closes idle connections after 75s;
// ours must go first, so that a request is never sent on one it is closing.
func TestIdleConnectionsClosedOnTime(t *testing.T) {
	const idle = 200 * time.Millisecond
	closed := make(chan time.Time, 4)
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	srv.Config.ConnState = func(c net.Conn, s http.ConnState) {
		if s == http.StateClosed {
			closed <- time.Now()
		}
	}
	srv.Start()
	defer srv.Close()
	if def := NewTransport(Options{}).IdleConnTimeout; def >= 75*time.Second {
		t.Errorf("default idle timeout %v; want under aiohttp's 75s", def)
	}

	u := New("a", mustURL(t, srv.URL), Options{IdleConnTimeout: idle})
	defer u.CloseIdleConnections()
	if _, err := get(t, u, "/queue"); err != nil {
		t.Fatal(err)
	}
	idleSince := time.Now()
	select {
	case at := <-closed:
		if d := at.Sub(idleSince); d < idle-20*time.Millisecond {
			t.Errorf("closed after %v idle; want no sooner than %v", d, idle)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the idle connection was never closed")
	}
}
