package server

import (
	"net/http"
	"strings"
	"testing"

	"github.com/comfygate/comfygate/internal/comfytest"
	"github.com/comfygate/comfygate/internal/session"
)

// Regression tests for findings of the security review.

// TestQueryPassesAsSent: ReverseProxy re-encoded queries with ';' and
// dropped the pair, which broke ComfyUI's /view?preview=webp;90.
func TestQueryPassesAsSent(t *testing.T) {
	g := start(t, comfytest.Options{}, "--api-key-file", keyFile(t, testKey2))
	const q = "filename=100%25.png&type=output&preview=webp;90&rand=0.5"
	do(t, "GET", g.URL+"/view?"+q+"&api_key="+testKey2, nil)
	if r, _ := g.Fake.LastRequest(); r.RawQuery != q {
		t.Errorf("upstream query %q; want %q unchanged", r.RawQuery, q)
	}
}

// TestUpgradeWithBodyRefused: a handshake that claims a body would have two
// readers on the client connection after the 101.
func TestUpgradeWithBodyRefused(t *testing.T) {
	g := start(t, comfytest.Options{})
	status := rawRequest(t, g.Addr, "GET", "/ws?clientId=b", "Connection", "Upgrade", "Upgrade", "websocket",
		"Sec-WebSocket-Version", "13", "Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==", "Content-Length", "0")
	if status != http.StatusSwitchingProtocols {
		t.Fatalf("a normal handshake: %d", status)
	}
	g.Fake.Reset()
	status = rawRequest(t, g.Addr, "GET", "/ws?clientId=b", "Connection", "Upgrade", "Upgrade", "websocket",
		"Sec-WebSocket-Version", "13", "Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==", "Content-Length", "10")
	if status != http.StatusBadRequest || len(g.Fake.Requests()) != 0 {
		t.Errorf("a handshake with a body: %d, reached ComfyUI %v", status, len(g.Fake.Requests()) > 0)
	}
}

// TestGuessesOnPublicRoutesCount: a wrong key on "/" answers differently
// from a right one (login redirect or page), so it must count toward the
// lockout like a guess anywhere else.
func TestGuessesOnPublicRoutesCount(t *testing.T) {
	g := start(t, comfytest.Options{}, "--api-key-file", keyFile(t, testKey2), "--lockout-attempts", "3")
	for range 3 {
		do(t, "GET", g.URL+"/?token=guess", nil, navigate...)
	}
	if resp, _ := do(t, "GET", g.URL+"/api/queue", nil, "X-API-Key", testKey2); resp.StatusCode != 429 {
		t.Errorf("after 3 guesses on /: %d; want 429", resp.StatusCode)
	}
}

// TestOldBrowserCookieOnlyReads: without Origin or Sec-Fetch-Site a cookie
// GET may be a cross-site navigation from an old browser; only reads pass.
func TestOldBrowserCookieOnlyReads(t *testing.T) {
	g := start(t, comfytest.Options{}, "--api-key-file", keyFile(t, adminKey))
	resp, _ := postLogin(t, g, adminKey, "/")
	cookie := session.CookieName + "=" + sessionCookie(t, resp).Value
	if resp, _ := do(t, "GET", g.URL+"/api/queue", nil, "Cookie", cookie); resp.StatusCode != 200 {
		t.Errorf("a read: %d", resp.StatusCode)
	}
	resp, body := do(t, "GET", g.URL+"/manager/reboot", nil, "Cookie", cookie)
	if resp.StatusCode != 403 || !strings.Contains(string(body), "cross_site") {
		t.Errorf("an admin GET without fetch metadata: %d %s", resp.StatusCode, body)
	}
	if resp, _ := do(t, "GET", g.URL+"/manager/reboot", nil, "Cookie", cookie, "Sec-Fetch-Site", "same-origin"); resp.StatusCode == 403 {
		t.Error("an admin GET from the gateway's own page was refused")
	}
}
