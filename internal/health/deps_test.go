package health

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"
)

func TestReadyWith(t *testing.T) {
	inner := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		writeProbe(w, http.StatusOK, probeBody{Status: "ready", Reason: "ComfyUI is up"})
	})
	var fail error
	checks := 0
	dep := &Dependency{Name: "Redis (--redis)", TTL: time.Hour, Check: func(context.Context) error {
		checks++
		return fail
	}}
	h := ReadyWith(inner, dep)
	probe := func() (int, probeBody) {
		w := httptest.NewRecorder()
		h.ServeHTTP(w, httptest.NewRequest("GET", "/health/ready", nil))
		var b probeBody
		json.Unmarshal(w.Body.Bytes(), &b)
		return w.Code, b
	}
	if code, b := probe(); code != 200 || b.Reason != "ComfyUI is up" {
		t.Errorf("dependency up: %d %+v", code, b)
	}
	// Within the TTL the result is reused: probes do not hit Redis.
	probe()
	if checks != 1 {
		t.Errorf("%d checks for two probes within the TTL; want 1", checks)
	}
	dep.TTL, dep.at = time.Nanosecond, time.Time{}
	fail = errors.New("Redis refused the connection (is it running?)")
	if code, b := probe(); code != 503 || b.Status != "not_ready" || b.Reason != "Redis (--redis): Redis refused the connection (is it running?)" {
		t.Errorf("dependency down: %d %+v", code, b)
	}
	if ReadyWith(inner) == nil {
		t.Error("ReadyWith without dependencies")
	}
}
