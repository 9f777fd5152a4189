package main

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/comfygate/comfygate/internal/comfytest"
	"github.com/comfygate/comfygate/internal/redistest"
)

// replicaProc is one comfygate process.
type replicaProc struct {
	cmd  *exec.Cmd
	base string
	logs *syncBuffer
}

func startReplica(t *testing.T, bin string, args ...string) *replicaProc {
	t.Helper()
	port := freePort(t)
	logs := &syncBuffer{}
	cmd := exec.Command(bin, append([]string{"--listen", "127.0.0.1", "--port", strconv.Itoa(port)}, args...)...)
	cmd.Stdout, cmd.Stderr = logs, logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &replicaProc{cmd: cmd, base: "http://127.0.0.1:" + strconv.Itoa(port), logs: logs}
	t.Cleanup(func() {
		p.cmd.Process.Kill()
		p.cmd.Wait()
		if t.Failed() {
			t.Logf("replica %s log:\n%s", p.base, p.logs.String())
		}
	})
	return p
}

// get does a GET with the key and returns the status and body (0 when the
// replica does not answer).
func (p *replicaProc) do(t *testing.T, method, path, key, body string) (int, []byte) {
	t.Helper()
	req, _ := http.NewRequest(method, p.base+path, strings.NewReader(body))
	req.Header.Set("X-API-Key", key)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, nil
	}
	defer resp.Body.Close()
	var b strings.Builder
	buf := make([]byte, 32<<10)
	for {
		n, err := resp.Body.Read(buf)
		b.Write(buf[:n])
		if err != nil {
			break
		}
	}
	return resp.StatusCode, []byte(b.String())
}

// waitUntil polls cond every 100ms until it holds or d passes.
func waitUntil(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(d); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		if cond() {
			return
		}
	}
	t.Fatalf("%s: not within %v", what, d)
}

// TestReplicasSurviveSIGKILL runs two comfygate processes sharing one
// Redis in front of two servers. Prompts are queued through both; then
// the replica that acts on the fleet's records is killed with SIGKILL
// together with one of the servers. The other replica takes over: every
// prompt completes, each once. Then Redis restarts, empty: the surviving
// replica goes on without a restart.
func TestReplicasSurviveSIGKILL(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes and waits out a lease (about 15 s)")
	}
	bin := buildBinary(t)
	rs := redistest.Start(t)
	// Servers that take the client's prompt id (ComfyUI 0.8), so that a
	// run on either is counted under the id the client knows.
	fakes := []*comfytest.Fake{comfytest.New(t, comfytest.Options{PromptIDs: true}), comfytest.New(t, comfytest.Options{PromptIDs: true})}
	for _, fk := range fakes {
		fk.SetNodeDelay(400 * time.Millisecond)
	}
	key := "replica-test-key-0123456789abcdef"
	keyFile := filepath.Join(t.TempDir(), "keys")
	os.WriteFile(keyFile, []byte("tester:"+key+"\n"), 0o600)
	args := []string{"--api-key-file", keyFile, "--redis", rs.RawURL(), "--log-format", "json"}
	for i, fk := range fakes {
		args = append(args, "--upstream", fmt.Sprintf("gpu%d=%s", i+1, fk.URL()))
	}
	// The first replica to start takes the lease; the second waits.
	a := startReplica(t, bin, args...)
	ready := func(p *replicaProc) func() bool {
		return func() bool {
			status, b := p.do(t, "GET", "/health", "", "")
			return status == 200 && strings.Count(string(b), `"status":"healthy"`) == 3 && !strings.Contains(string(b), `"nodes":0`)
		}
	}
	waitUntil(t, 20*time.Second, "replica a ready", ready(a))
	b := startReplica(t, bin, args...)
	waitUntil(t, 20*time.Second, "replica b ready", ready(b))
	if !strings.Contains(a.logs.String(), "this replica now acts on prompt records") {
		t.Fatalf("replica a does not hold the lease:\n%s", a.logs.String())
	}

	var ids []string
	for i := range 8 {
		p := []*replicaProc{a, b}[i%2]
		body := fmt.Sprintf(`{"client_id":"t","prompt":{"1":{"class_type":"EmptyImage","inputs":{"width":8,"height":8,"batch_size":1,"color":%d}},`+
			`"2":{"class_type":"SaveImage","inputs":{"images":["1",0],"filename_prefix":"kill%d"}}}}`, i, i)
		status, resp := p.do(t, "POST", "/api/prompt", key, body)
		var pr struct {
			PromptID string `json:"prompt_id"`
		}
		if status != 200 || json.Unmarshal(resp, &pr) != nil {
			t.Fatalf("POST /prompt: %d %s", status, resp)
		}
		ids = append(ids, pr.PromptID)
	}
	// Mid-queue: the acting replica and one server die at once.
	if err := a.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	a.cmd.Wait()
	fakes[0].Close()

	done := func(id string) bool {
		status, resp := b.do(t, "GET", "/api/history/"+id, key, "")
		var h map[string]struct {
			Status struct {
				Completed bool `json:"completed"`
			} `json:"status"`
		}
		return status == 200 && json.Unmarshal(resp, &h) == nil && h[id].Status.Completed
	}
	for _, id := range ids {
		waitUntil(t, 60*time.Second, "prompt "+id+" through replica b", func() bool {
			// gpu1's own history died with it: a prompt that finished
			// there before is done (it ran once), not requeued.
			return done(id) || completedOn(fakes[0], id)
		})
	}
	if !strings.Contains(b.logs.String(), "this replica now acts on prompt records") {
		t.Error("replica b never took over the fleet's records")
	}
	// Each ran to completion once, on whichever server.
	runs := map[string]int{}
	for _, fk := range fakes {
		for _, id := range fk.Completed() {
			runs[id]++
		}
	}
	for _, id := range ids {
		if runs[id] != 1 {
			t.Errorf("prompt %s ran to completion %d times; want once", id, runs[id])
		}
	}

	// Redis restarts empty; replica b serves on without a restart.
	rs.Restart()
	waitUntil(t, 20*time.Second, "a prompt through b after Redis restarted", func() bool {
		status, _ := b.do(t, "POST", "/api/prompt", key, `{"prompt":{"1":{"class_type":"EmptyImage","inputs":{"width":8,"height":8,"batch_size":1,"color":0}},`+
			`"2":{"class_type":"SaveImage","inputs":{"images":["1",0],"filename_prefix":"after"}}}}`)
		return status == 200
	})
}

// completedOn reports whether prompt id ran to completion on fk (a dead
// server: its history went with it, so a prompt done there before it died
// is not to be found through the gateway, and must not run again).
func completedOn(fk *comfytest.Fake, id string) bool {
	for _, r := range fk.Runs() {
		if r.Completed && r.PromptID == id {
			return true
		}
	}
	return false
}
