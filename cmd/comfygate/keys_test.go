package main

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/comfygate/comfygate/internal/auth"
	"github.com/comfygate/comfygate/internal/route"
)

func TestKeysNewHashCheck(t *testing.T) {
	var out, errOut bytes.Buffer
	if err := run(t.Context(), []string{"keys", "new", "viewer", "--scopes", "read"}, noEnv, nil, &out, &errOut); err != nil {
		t.Fatal(err)
	}
	secret := regexp.MustCompile(`cg_[A-Za-z0-9_-]{43}`).FindString(out.String())
	line := regexp.MustCompile(`viewer:sha256:[0-9a-f]{64} read`).FindString(out.String())
	if secret == "" || line == "" {
		t.Fatalf("keys new printed:\n%s", out.String())
	}

	// hash gives the same line for the same key.
	out.Reset()
	if err := run(t.Context(), []string{"keys", "hash", "viewer", "--scopes", "read"}, noEnv, strings.NewReader(secret+"\n"), &out, &errOut); err != nil {
		t.Fatal(err)
	}
	if got := strings.TrimSpace(out.String()); got != line {
		t.Errorf("keys hash = %q; want %q", got, line)
	}

	// The line works in a key file, for that key, with that scope.
	file := filepath.Join(t.TempDir(), "keys")
	os.WriteFile(file, []byte("# team\n"+line+"\n"), 0o600)
	f, _ := os.Open(file)
	keys, err := auth.ParseKeyFile(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	k, ok := auth.NewKeySet(keys...).Lookup(secret)
	if !ok || k.Name != "viewer" || k.Scope != route.ScopeRead {
		t.Errorf("lookup of the new key: %+v, %v", k, ok)
	}
	out.Reset()
	if err := run(t.Context(), []string{"keys", "check", file}, noEnv, nil, &out, &errOut); err != nil || !strings.Contains(out.String(), "1 key OK\n") {
		t.Errorf("check: %v\n%s", err, out.String())
	}

	os.WriteFile(file, []byte(line+"\nbad\x01\nviewer:abcdefabcdefabcdef1\n"), 0o600)
	err = run(t.Context(), []string{"keys", "check", file}, noEnv, nil, &out, &errOut)
	if err == nil || !strings.Contains(err.Error(), "line 2: key contains a control character") || !strings.Contains(err.Error(), `line 3: key name "viewer" is already used on line 1`) {
		t.Errorf("check of a bad file: %v", err)
	}
}

func TestKeysUsageErrors(t *testing.T) {
	for _, args := range [][]string{
		{"keys", "new"},
		{"keys", "new", "bad name"},
		{"keys", "new", "x", "--scopes", "root"},
		{"keys", "frobnicate"},
		{"keys", "check"},
		// Issue #15 item 8: a bare "comfygate keys" printed the usage and
		// exited 0, as if something had been done.
		{"keys"},
	} {
		var out, errOut bytes.Buffer
		if err := run(t.Context(), args, noEnv, nil, &out, &errOut); !errors.Is(err, errUsage) || !strings.Contains(errOut.String(), "Usage:") {
			t.Errorf("%q: err %v, stderr %q", args, err, errOut.String())
		}
	}
	var out, errOut bytes.Buffer
	if err := run(t.Context(), []string{"keys", "hash"}, noEnv, strings.NewReader("has space\n"), &out, &errOut); err == nil || strings.Contains(err.Error(), "has space") {
		t.Errorf("hash of a bad key: %v", err)
	}
}
