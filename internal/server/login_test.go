package server

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/coder/websocket"

	"github.com/comfygate/comfygate/internal/comfytest"
	"github.com/comfygate/comfygate/internal/session"
)

// browser headers for a top-level navigation.
var navigate = []string{"Accept", "text/html,application/xhtml+xml,*/*;q=0.8", "Sec-Fetch-Mode", "navigate", "Sec-Fetch-Site", "none"}

// postLogin posts the login form as the gateway's own page would and returns
// the response.
func postLogin(t *testing.T, g *gateway, key, next string, header ...string) (*http.Response, string) {
	t.Helper()
	form := url.Values{"key": {key}, "next": {next}}
	h := append([]string{"Content-Type", "application/x-www-form-urlencoded", "Origin", g.URL, "Sec-Fetch-Site", "same-origin"}, header...)
	resp, body := do(t, "POST", g.URL+"/login", strings.NewReader(form.Encode()), h...)
	return resp, string(body)
}

func sessionCookie(t *testing.T, resp *http.Response) *http.Cookie {
	t.Helper()
	for _, c := range resp.Cookies() {
		if c.Name == session.CookieName {
			return c
		}
	}
	t.Fatalf("no session cookie in %v", resp.Header["Set-Cookie"])
	return nil
}

func TestBrowserIsSentToLogin(t *testing.T) {
	g := start(t, comfytest.Options{}, "--api-key-file", keyFile(t, submitKey))
	resp, _ := do(t, "GET", g.URL+"/api/object_info?x=1", nil, navigate...)
	if resp.StatusCode != http.StatusSeeOther || resp.Header.Get("Location") != "/login?next=%2Fapi%2Fobject_info%3Fx%3D1" {
		t.Errorf("browser on a protected page: %d %q", resp.StatusCode, resp.Header.Get("Location"))
	}
	resp, _ = do(t, "GET", g.URL+"/", nil, navigate...)
	if resp.StatusCode != http.StatusSeeOther || resp.Header.Get("Location") != "/login" {
		t.Errorf("browser on the UI page: %d %q", resp.StatusCode, resp.Header.Get("Location"))
	}
	// API clients keep the documented behaviour.
	if resp, _ := do(t, "GET", g.URL+"/api/object_info", nil, "Accept", "application/json"); resp.StatusCode != 401 {
		t.Errorf("API client: %d; want 401", resp.StatusCode)
	}
	if resp, _ := do(t, "GET", g.URL+"/", nil); resp.StatusCode != 200 {
		t.Errorf("curl on /: %d; want the public page", resp.StatusCode)
	}
	// A script's fetch (not a navigation) gets the 401 it can handle.
	if resp, _ := do(t, "GET", g.URL+"/api/queue", nil, "Accept", "text/html", "Sec-Fetch-Mode", "cors"); resp.StatusCode != 401 {
		t.Errorf("fetch from a page: %d; want 401", resp.StatusCode)
	}
	// The login page itself.
	resp, body := do(t, "GET", g.URL+"/login?next=%2Fqueue", nil, navigate...)
	for _, want := range []string{`<label for="key">API key</label>`, `type="password"`, `name="next" value="/queue"`} {
		if !strings.Contains(string(body), want) {
			t.Errorf("login page lacks %q", want)
		}
	}
	if csp := resp.Header.Get("Content-Security-Policy"); !strings.Contains(csp, "default-src 'none'") || resp.Header.Get("X-Frame-Options") != "DENY" {
		t.Errorf("login page headers: CSP %q, XFO %q", csp, resp.Header.Get("X-Frame-Options"))
	}
	if strings.Contains(string(body), "http://") || strings.Contains(string(body), "https://") {
		t.Error("the login page loads something from elsewhere")
	}
}

func TestLoginSessionAndLogout(t *testing.T) {
	file := keyFile(t, "alice:"+submitKey)
	g := start(t, comfytest.Options{}, "--api-key-file", file, "--protect-ws")

	resp, body := postLogin(t, g, "cg_wrong_"+submitKey[9:], "/")
	if resp.StatusCode != 401 || !strings.Contains(body, "That key is not valid.") || len(resp.Cookies()) != 0 {
		t.Errorf("wrong key: %d, cookies %v", resp.StatusCode, resp.Cookies())
	}
	if strings.Contains(body, submitKey[9:]) {
		t.Error("the error page echoes the key")
	}

	resp, _ = postLogin(t, g, submitKey, "/api/queue")
	if resp.StatusCode != http.StatusSeeOther || resp.Header.Get("Location") != "/api/queue" {
		t.Fatalf("login: %d %q", resp.StatusCode, resp.Header.Get("Location"))
	}
	c := sessionCookie(t, resp)
	if !c.HttpOnly || c.SameSite != http.SameSiteLaxMode || c.Path != "/" || c.MaxAge != 12*3600 || c.Secure {
		t.Errorf("cookie attributes: %+v", c)
	}
	if strings.Contains(c.Value, submitKey) || len(c.Value) < 40 {
		t.Errorf("cookie value %q is not an opaque random id", c.Value)
	}
	cookie := session.CookieName + "=" + c.Value

	// REST with the cookie, from the gateway's own pages.
	resp, _ = do(t, "GET", g.URL+"/api/queue", nil, "Cookie", "theme=dark; "+cookie, "Sec-Fetch-Site", "same-origin")
	if resp.StatusCode != 200 {
		t.Errorf("GET with the session: %d", resp.StatusCode)
	}
	r, _ := g.Fake.LastRequest()
	if got := r.Header.Get("Cookie"); got != "theme=dark" {
		t.Errorf("upstream Cookie = %q; want the session cookie removed and the rest kept", got)
	}
	resp, _ = do(t, "GET", g.URL+"/view?filename=gw_probe_207800_00001_.png&type=output", nil, "Cookie", cookie, "Sec-Fetch-Site", "same-origin", "Sec-Fetch-Dest", "image")
	if resp.StatusCode != 200 {
		t.Errorf("image with the session: %d", resp.StatusCode)
	}
	resp, _ = do(t, "POST", g.URL+"/api/interrupt", nil, "Cookie", cookie, "Origin", g.URL)
	if resp.StatusCode != 200 {
		t.Errorf("same-origin POST with the session: %d", resp.StatusCode)
	}

	// Cross-site use of the cookie is refused, whatever the method.
	crossSite := []struct {
		name, method string
		header       []string
	}{
		{"POST from another origin", "POST", []string{"Origin", "https://evil.example"}},
		{"POST from a sibling port", "POST", []string{"Origin", "http://127.0.0.1:1"}},
		{"POST with Origin null", "POST", []string{"Origin", "null"}},
		{"POST without Origin or fetch metadata", "POST", nil},
		{"POST marked cross-site", "POST", []string{"Sec-Fetch-Site", "cross-site"}},
		{"GET marked cross-site", "GET", []string{"Sec-Fetch-Site", "cross-site"}},
		{"GET marked same-site", "GET", []string{"Sec-Fetch-Site", "same-site"}},
	}
	for _, tt := range crossSite {
		g.Fake.Reset()
		resp, body := do(t, tt.method, g.URL+"/api/interrupt", nil, append([]string{"Cookie", cookie}, tt.header...)...)
		if resp.StatusCode != 403 || !strings.Contains(string(body), "cross_site") || len(g.Fake.Requests()) != 0 {
			t.Errorf("%s: %d %s", tt.name, resp.StatusCode, body)
		}
	}
	// A key in a header works from anywhere, as before (a public Host name,
	// since ComfyUI's own check refuses foreign origins on a loopback Host).
	if resp, _ := do(t, "POST", g.URL+"/api/interrupt", nil, "X-API-Key", submitKey, "Origin", "https://app.example", "Host", "comfy.example.com"); resp.StatusCode != 200 {
		t.Errorf("header key from another origin: %d", resp.StatusCode)
	}

	// The WebSocket under --protect-ws, with the cookie.
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	ws, _, err := dialWS(ctx, g, "/ws?clientId=browser", http.Header{"Cookie": {cookie}, "Origin": {g.URL}}, nil)
	if err != nil {
		t.Fatalf("socket with the session: %v", err)
	}
	readJSON(t, ctx, ws)
	ws.Close(websocket.StatusNormalClosure, "")
	if _, resp, err := dialWS(ctx, g, "/ws?clientId=evil", http.Header{"Cookie": {cookie}, "Origin": {"https://evil.example"}}, nil); err == nil || resp.StatusCode != 403 {
		t.Errorf("socket with the session from another site: %v", err)
	}

	// Another site cannot sign the visitor out.
	do(t, "GET", g.URL+"/logout", nil, "Cookie", cookie, "Sec-Fetch-Site", "cross-site")
	if resp, _ := do(t, "GET", g.URL+"/api/queue", nil, "Cookie", cookie, "Sec-Fetch-Site", "same-origin"); resp.StatusCode != 200 {
		t.Errorf("a cross-site /logout ended the session: %d", resp.StatusCode)
	}

	// Logout ends it.
	resp, _ = do(t, "POST", g.URL+"/logout", nil, "Cookie", cookie, "Origin", g.URL)
	if resp.StatusCode != http.StatusSeeOther || !strings.HasPrefix(resp.Header.Get("Location"), "/login") {
		t.Errorf("logout: %d %q", resp.StatusCode, resp.Header.Get("Location"))
	}
	if c := sessionCookie(t, resp); c.MaxAge >= 0 || c.Value != "" {
		t.Errorf("logout cookie %+v does not clear", c)
	}
	if resp, _ := do(t, "GET", g.URL+"/api/queue", nil, "Cookie", cookie, "Sec-Fetch-Site", "same-origin"); resp.StatusCode != 401 {
		t.Errorf("after logout: %d; want 401", resp.StatusCode)
	}
}

func TestSessionEndsWhenKeyIsRemoved(t *testing.T) {
	file := keyFile(t, "alice:"+submitKey+"\nbob:"+adminKey)
	g := start(t, comfytest.Options{}, "--api-key-file", file)
	resp, _ := postLogin(t, g, submitKey, "/")
	cookie := session.CookieName + "=" + sessionCookie(t, resp).Value
	get := func() int {
		resp, _ := do(t, "GET", g.URL+"/api/queue", nil, "Cookie", cookie, "Sec-Fetch-Site", "same-origin")
		return resp.StatusCode
	}
	if s := get(); s != 200 {
		t.Fatalf("before: %d", s)
	}
	os.WriteFile(file, []byte("bob:"+adminKey+"\n"), 0o600)
	g.Server.ReloadKeys()
	if s := get(); s != 401 {
		t.Errorf("after alice's key was removed: %d; want 401", s)
	}
	// Putting the key back does not revive the session.
	os.WriteFile(file, []byte("alice:"+submitKey+"\nbob:"+adminKey+"\n"), 0o600)
	g.Server.ReloadKeys()
	if s := get(); s != 401 {
		t.Errorf("after the key came back: %d; want 401 (sessions are not revived)", s)
	}
}

func TestLoginRedirectStaysLocal(t *testing.T) {
	g := start(t, comfytest.Options{}, "--api-key-file", keyFile(t, submitKey), "--lockout-attempts", "0")
	tests := map[string]string{
		"/api/queue?a=1":         "/api/queue?a=1",
		"":                       "/",
		"//evil.example/x":       "/",
		"https://evil.example/":  "/",
		"/\\evil.example":        "/",
		"\\\\evil.example":       "/",
		"/%2F%2Fevil.example":    "/%2F%2Fevil.example", // a path here, not a host
		"javascript:alert(1)":    "/",
		"/ok\r\nSet-Cookie: x=1": "/",
		"http:evil.example":      "/",
		" /x":                    "/",
	}
	for i, next := range sortedKeys(tests) {
		if i >= 5 { // stay under the 5-a-minute login limit
			break
		}
		resp, _ := postLogin(t, g, submitKey, next)
		if got := resp.Header.Get("Location"); got != tests[next] {
			t.Errorf("next=%q: Location %q; want %q", next, got, tests[next])
		}
	}
}

// TestLocalRedirectTable checks the whole table without the login limit.
func TestLocalRedirectTable(t *testing.T) {
	g := start(t, comfytest.Options{}, "--api-key-file", keyFile(t, submitKey))
	for next, want := range map[string]string{
		"//evil.example/x": "/login", "https://evil.example/": "/login", "/\\evil.example": "/login",
		"javascript:alert(1)": "/login", "/api/queue": "/login?next=%2Fapi%2Fqueue",
	} {
		resp, body := do(t, "GET", g.URL+"/login?next="+url.QueryEscape(next), nil, navigate...)
		wantNext := "/"
		if want != "/login" {
			wantNext = "/api/queue"
		}
		if resp.StatusCode != 200 || !strings.Contains(string(body), `name="next" value="`+wantNext+`"`) {
			t.Errorf("login page for next=%q keeps %q? body lacks it", next, wantNext)
		}
	}
}

func sortedKeys(m map[string]string) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	// Most dangerous first, so the rate limit never hides them.
	order := []string{"//evil.example/x", "https://evil.example/", "/\\evil.example", "javascript:alert(1)", "/ok\r\nSet-Cookie: x=1"}
	return append(order, keys...)
}

func TestLoginLimits(t *testing.T) {
	g := start(t, comfytest.Options{}, "--api-key-file", keyFile(t, submitKey), "--lockout-attempts", "0")
	for i := range 5 {
		if resp, _ := postLogin(t, g, "nope", "/"); resp.StatusCode != 401 {
			t.Fatalf("attempt %d: %d", i, resp.StatusCode)
		}
	}
	resp, body := postLogin(t, g, submitKey, "/") // even the right key
	if resp.StatusCode != 429 || resp.Header.Get("Retry-After") == "" || !strings.Contains(body, "Too many sign-in attempts") {
		t.Errorf("sixth attempt in a minute: %d %q", resp.StatusCode, resp.Header.Get("Retry-After"))
	}
	// A login form posted from another site is refused before the key is looked at.
	g2 := start(t, comfytest.Options{}, "--api-key-file", keyFile(t, submitKey))
	form := url.Values{"key": {submitKey}, "next": {"/"}}
	resp, _ = do(t, "POST", g2.URL+"/login", strings.NewReader(form.Encode()), "Content-Type", "application/x-www-form-urlencoded", "Origin", "https://evil.example")
	if resp.StatusCode != 403 || len(resp.Cookies()) != 0 {
		t.Errorf("cross-site login: %d %v", resp.StatusCode, resp.Cookies())
	}
}

func TestLoginOffAndWithoutKeys(t *testing.T) {
	g := start(t, comfytest.Options{}, "--api-key-file", keyFile(t, submitKey), "--login=false")
	if resp, _ := do(t, "GET", g.URL+"/api/queue", nil, navigate...); resp.StatusCode != 401 {
		t.Errorf("--login=false: browser gets %d; want 401", resp.StatusCode)
	}
	if resp, _ := do(t, "GET", g.URL+"/login", nil); resp.StatusCode == 200 {
		t.Error("--login=false still serves a login page")
	}
	g2 := start(t, comfytest.Options{})
	if resp, _ := do(t, "GET", g2.URL+"/api/queue", nil, navigate...); resp.StatusCode != 200 {
		t.Errorf("no keys: %d; want the pass-through", resp.StatusCode)
	}
}

func TestSecureCookieOverTLS(t *testing.T) {
	certPEM, keyPEM := selfSigned(t)
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "c.pem"), certPEM, 0o600)
	os.WriteFile(filepath.Join(dir, "k.pem"), keyPEM, 0o600)
	g := start(t, comfytest.Options{}, "--tls-certfile", filepath.Join(dir, "c.pem"), "--tls-keyfile", filepath.Join(dir, "k.pem"), "--api-key-file", keyFile(t, submitKey))
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(certPEM)
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}},
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	form := url.Values{"key": {submitKey}}
	req, _ := http.NewRequest("POST", g.URL+"/login", strings.NewReader(form.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.Header.Set("Origin", g.URL)
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if c := sessionCookie(t, resp); !c.Secure {
		t.Errorf("cookie over HTTPS is not Secure: %+v", c)
	}
}

// TestSessionExpiry runs the chain in process in a synctest bubble, so 12
// hours pass in no time.
func TestSessionExpiry(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cfg := loadConfig(t, "--api-key-file", keyFile(t, submitKey), "--session-ttl", "12h")
		srv, err := newServer(cfg, discardLogger(), "test", nil, staticTransport{})
		if err != nil {
			t.Fatal(err)
		}
		h := srv.Handler()
		req := httptest.NewRequest("POST", "http://gw/login", strings.NewReader("key="+submitKey))
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		req.Header.Set("Origin", "http://gw")
		w := httptest.NewRecorder()
		h.ServeHTTP(w, req)
		cookie := w.Result().Cookies()[0]
		get := func() int {
			r := httptest.NewRequest("GET", "http://gw/api/queue", nil)
			r.AddCookie(cookie)
			r.Header.Set("Sec-Fetch-Site", "same-origin")
			w := httptest.NewRecorder()
			h.ServeHTTP(w, r)
			return w.Code
		}
		if c := get(); c != 200 {
			t.Fatalf("fresh session: %d", c)
		}
		time.Sleep(12*time.Hour - time.Second)
		if c := get(); c != 200 {
			t.Errorf("a second before expiry: %d", c)
		}
		time.Sleep(2 * time.Second)
		if c := get(); c != 401 {
			t.Errorf("after 12h: %d; want 401", c)
		}
		if n := srv.sessions.(*session.Memory).Len(); n != 0 {
			t.Errorf("%d expired sessions still stored", n)
		}
	})
}
