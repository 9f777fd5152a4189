package redistest

import (
	"context"
	"testing"
	"time"
)

// hangGuard is how long a call may take before the test calls it a hang.
// It is no latency bound: calls are bounded by the client's timeouts, well
// under a second; this only keeps a broken bound from hanging the test run.
const hangGuard = 30 * time.Second

// Outage checks that op, a call through a client of s, returns an error
// rather than hanging while s is stuck (paused) and while it is down
// (killed), and that the same client works again once s is back (resumed,
// then restarted empty). op must succeed whenever Redis answers.
func Outage(t *testing.T, s *Server, op func(ctx context.Context) error) {
	t.Helper()
	Eventually(t, op)

	s.Pause()
	if err := Within(t, op); err == nil {
		t.Error("a call to a stuck Redis succeeded")
	}
	s.Resume()
	Eventually(t, op)

	s.Stop()
	if err := Within(t, op); err == nil {
		t.Error("a call to a stopped Redis succeeded")
	}
	s.Restart()
	Eventually(t, op)
}

// Within runs op and returns its error, failing the test if op does not
// return within the hang guard.
func Within(t *testing.T, op func(ctx context.Context) error) error {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- op(context.Background()) }()
	select {
	case err := <-done:
		return err
	case <-time.After(hangGuard):
		t.Fatalf("a call hung for %s", hangGuard)
		return nil
	}
}

// Eventually retries op until it succeeds (Redis coming back, the client's
// breaker closing), failing the test after the hang guard.
func Eventually(t *testing.T, op func(ctx context.Context) error) {
	t.Helper()
	deadline := time.Now().Add(hangGuard)
	for {
		err := Within(t, op)
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("still failing after %s: %v", hangGuard, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
