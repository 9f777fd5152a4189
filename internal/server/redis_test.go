package server

import (
	"context"
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/comfygate/comfygate/internal/comfytest"
	"github.com/comfygate/comfygate/internal/redistest"
	"github.com/comfygate/comfygate/internal/session"
)

const prompt = `{"prompt":{"1":{"class_type":"EmptyImage","inputs":{"width":8,"height":8,"batch_size":1,"color":0}},"2":{"class_type":"SaveImage","inputs":{"images":["1",0],"filename_prefix":"x"}}}}`

// TestRedisReplicasShareState: two gateways on one Redis act as one for
// browser sessions and per-key limits: log in on one, use the UI through
// the other, log out there, and the session is gone on both.
func TestRedisReplicasShareState(t *testing.T) {
	rs := redistest.Start(t)
	fake := comfytest.New(t, comfytest.Options{})
	args := []string{"--upstream", fake.URL(), "--api-key-file", keyFile(t, "alice:"+submitKey), "--redis", rs.RawURL(), "--key-prompt-limit", "1"}
	a, b := startWith(t, fake, args...), startWith(t, fake, args...)

	resp, _ := postLogin(t, a, submitKey, "/")
	if resp.StatusCode != http.StatusSeeOther {
		t.Fatalf("login on A: %d", resp.StatusCode)
	}
	cookie := session.CookieName + "=" + sessionCookie(t, resp).Value
	if resp, _ := do(t, "GET", b.URL+"/api/queue", nil, "Cookie", cookie, "Sec-Fetch-Site", "same-origin"); resp.StatusCode != 200 {
		t.Errorf("A's session on B: %d", resp.StatusCode)
	}
	if resp, _ := do(t, "POST", b.URL+"/logout", nil, "Cookie", cookie, "Origin", b.URL); resp.StatusCode != http.StatusSeeOther {
		t.Errorf("logout on B: %d", resp.StatusCode)
	}
	if resp, _ := do(t, "GET", a.URL+"/api/queue", nil, "Cookie", cookie, "Sec-Fetch-Site", "same-origin"); resp.StatusCode != 401 {
		t.Errorf("A after logout on B: %d; want 401", resp.StatusCode)
	}

	// One prompt a minute for the key, whichever replica it goes to.
	if resp, _ := do(t, "POST", a.URL+"/api/prompt", strings.NewReader(prompt), "X-API-Key", submitKey); resp.StatusCode != 200 {
		t.Fatalf("first prompt on A: %d", resp.StatusCode)
	}
	if resp, body := do(t, "POST", b.URL+"/api/prompt", strings.NewReader(prompt), "X-API-Key", submitKey); resp.StatusCode != 429 || !strings.Contains(string(body), "prompt rate limit") {
		t.Errorf("second prompt on B: %d %s; want 429", resp.StatusCode, body)
	}
}

// TestRedisLockoutAcrossReplicas: failed attempts on two replicas add up.
func TestRedisLockoutAcrossReplicas(t *testing.T) {
	rs := redistest.Start(t)
	fake := comfytest.New(t, comfytest.Options{})
	args := []string{"--upstream", fake.URL(), "--api-key-file", keyFile(t, "alice:"+submitKey), "--redis", rs.RawURL(), "--lockout-attempts", "2"}
	a, b := startWith(t, fake, args...), startWith(t, fake, args...)
	do(t, "GET", a.URL+"/api/queue", nil, "X-API-Key", "wrong-"+submitKey)
	do(t, "GET", b.URL+"/api/queue", nil, "X-API-Key", "wrong-"+submitKey)
	if resp, _ := do(t, "GET", a.URL+"/api/queue", nil, "X-API-Key", submitKey); resp.StatusCode != 429 {
		t.Errorf("after one failure on each replica: %d; want 429", resp.StatusCode)
	}
}

// TestRedisOutageServer: with Redis down, what needs only the key file
// keeps working, browser sessions fail closed with a clear 503, the
// readiness probe says why, and everything comes back with Redis, without
// a restart of the gateway. The password in the URL is never logged.
func TestRedisOutageServer(t *testing.T) {
	const password = "pw-s3cret-do-not-log"
	rs := redistest.StartWith(t, "--requirepass", password)
	url := "redis://:" + password + "@" + rs.Addr() + "/0"
	g := start(t, comfytest.Options{}, "--api-key-file", keyFile(t, "alice:"+submitKey), "--redis", url, "--lockout-attempts", "3")
	ready := func(ctx context.Context) (int, string) {
		req, _ := http.NewRequestWithContext(ctx, "GET", g.URL+"/health/ready", nil)
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, body := ready(t.Context()); code != 200 {
		t.Fatalf("ready with Redis up: %d %s", code, body)
	}
	resp, _ := postLogin(t, g, submitKey, "/")
	cookie := session.CookieName + "=" + sessionCookie(t, resp).Value

	rs.Stop()
	if resp, _ := do(t, "GET", g.URL+"/api/queue", nil, "X-API-Key", submitKey); resp.StatusCode != 200 {
		t.Errorf("API key with Redis down: %d; want 200", resp.StatusCode)
	}
	// A wrong key is still refused (the lockout is not counted).
	for range 4 {
		if resp, _ := do(t, "GET", g.URL+"/api/queue", nil, "X-API-Key", "wrong-"+submitKey); resp.StatusCode != 401 {
			t.Errorf("wrong key with Redis down: %d; want 401", resp.StatusCode)
		}
	}
	resp, body := do(t, "GET", g.URL+"/api/queue", nil, "Cookie", cookie, "Sec-Fetch-Site", "same-origin")
	if resp.StatusCode != 503 || !strings.Contains(string(body), "session_store_unavailable") || resp.Header.Get("Retry-After") == "" {
		t.Errorf("session with Redis down: %d %s; want 503 session_store_unavailable", resp.StatusCode, body)
	}
	if resp, _ := do(t, "GET", g.URL+"/", nil, append([]string{"Cookie", cookie}, navigate...)...); resp.StatusCode != 503 {
		t.Errorf("UI page with a session and Redis down: %d; want 503, not a login page that cannot work", resp.StatusCode)
	}
	if resp, body := postLogin(t, g, submitKey, "/"); resp.StatusCode != 503 || !strings.Contains(body, "session store") || len(resp.Cookies()) != 0 {
		t.Errorf("login with Redis down: %d; want 503 and no cookie", resp.StatusCode)
	}
	// The probe caches its check for a second: wait for it to notice.
	redistest.Eventually(t, func(ctx context.Context) error {
		if code, body := ready(ctx); code != 503 || !strings.Contains(body, "Redis") {
			return errors.New(body)
		}
		return nil
	})

	rs.Restart()
	redistest.Eventually(t, func(ctx context.Context) error {
		if code, body := ready(ctx); code != 200 {
			return errors.New(body)
		}
		return nil
	})
	// Redis came back empty: the old session is gone (sign in again),
	// and signing in works again.
	if resp, _ := do(t, "GET", g.URL+"/api/queue", nil, "Cookie", cookie, "Sec-Fetch-Site", "same-origin"); resp.StatusCode != 401 {
		t.Errorf("a session lost with Redis's data: %d; want 401", resp.StatusCode)
	}
	if resp, _ := postLogin(t, g, submitKey, "/"); resp.StatusCode != http.StatusSeeOther {
		t.Errorf("login after Redis is back: %d", resp.StatusCode)
	}
	if logs := g.logs.String(); strings.Contains(logs, password) {
		t.Error("the Redis password is in the log")
	} else if !strings.Contains(logs, "Redis is unreachable") || !strings.Contains(logs, "Redis is reachable again") {
		t.Errorf("the log does not say Redis went and came back:\n%s", logs)
	}
}

// TestRedisWrongPassword: readiness names the problem.
func TestRedisWrongPassword(t *testing.T) {
	rs := redistest.StartWith(t, "--requirepass", "right")
	g := start(t, comfytest.Options{}, "--api-key-file", keyFile(t, submitKey), "--redis", "redis://:wrong@"+rs.Addr())
	resp, body := do(t, "GET", g.URL+"/health/ready", nil)
	if resp.StatusCode != 503 || !strings.Contains(string(body), "credentials") || strings.Contains(string(body), rs.Addr()) {
		t.Errorf("ready with a wrong password: %d %s", resp.StatusCode, body)
	}
}
