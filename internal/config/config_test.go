package config

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/comfygate/comfygate/internal/testcert"
)

const key = "0123456789abcdef0123456789abcdef"

func env(m map[string]string) func(string) (string, bool) {
	return func(k string) (string, bool) { v, ok := m[k]; return v, ok }
}

func writeFile(t *testing.T, name, content string, mode os.FileMode) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(content), mode); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestDefaults(t *testing.T) {
	c, err := Load(nil, env(nil))
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]string{"127.0.0.1:8188"}, c.Addrs()); diff != "" {
		t.Errorf("Addrs (-want +got):\n%s", diff)
	}
	if got := c.Upstream.String(); got != "http://127.0.0.1:8189" {
		t.Errorf("Upstream = %q", got)
	}
	if c.AuthEnabled() || c.ProtectWS || c.TLS() {
		t.Errorf("auth, protect-ws and TLS must be off by default: %+v", c)
	}
	if c.MaxBodyBytes != 100<<20 {
		t.Errorf("MaxBodyBytes = %d; want 100 MB", c.MaxBodyBytes)
	}
	if c.HealthTTL != time.Second || c.KeyPollInterval != time.Second {
		t.Errorf("HealthTTL = %v, KeyPollInterval = %v; want 1s each (only tests lower them)", c.HealthTTL, c.KeyPollInterval)
	}
	if len(c.Warnings) != 0 {
		t.Errorf("unexpected warnings: %q", c.Warnings)
	}
}

func TestFlagsEnvPrecedence(t *testing.T) {
	keyFile := writeFile(t, "keys", "# comment\n"+key+"\n", 0o600)
	c, err := Load([]string{"--port", "9000", "--protect-ws"}, env(map[string]string{
		"COMFYGATE_PORT":         "7000", // the flag wins
		"COMFYGATE_API_KEY_FILE": keyFile,
		"COMFYGATE_UPSTREAM":     "http://10.0.0.5:8188/",
		"COMFYGATE_LISTEN":       "127.0.0.1,::1",
	}))
	if err != nil {
		t.Fatal(err)
	}
	if c.Port != 9000 || !c.ProtectWS {
		t.Errorf("flags lost: port %d, protect-ws %v", c.Port, c.ProtectWS)
	}
	if got := c.Upstream.String(); got != "http://10.0.0.5:8188" {
		t.Errorf("Upstream = %q (trailing slash should go)", got)
	}
	if diff := cmp.Diff([]string{"127.0.0.1:9000", "[::1]:9000"}, c.Addrs()); diff != "" {
		t.Errorf("Addrs (-want +got):\n%s", diff)
	}
	if len(c.Keys) != 1 || c.Keys[0].Name != "key-1" {
		t.Errorf("Keys = %+v", c.Keys)
	}
}

func TestKeySources(t *testing.T) {
	keyFile := writeFile(t, "keys", key+"\nfedcba9876543210fedcba9876543210\n", 0o600)
	c, err := Load([]string{"--api-key", "abcdefabcdefabcdef12", "--api-key-file", keyFile}, env(nil))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, k := range c.Keys {
		names = append(names, k.Name)
	}
	if diff := cmp.Diff([]string{"api-key", "key-1", "key-2"}, names); diff != "" {
		t.Errorf("key names (-want +got):\n%s", diff)
	}
	if !hasWarning(c.Warnings, "visible to other users") {
		t.Errorf("no warning for --api-key on the command line: %q", c.Warnings)
	}

	// From the environment the key is not in ps: no warning.
	c, err = Load(nil, env(map[string]string{"COMFYGATE_API_KEY": key}))
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Keys) != 1 || hasWarning(c.Warnings, "visible to other users") {
		t.Errorf("env key: keys %d, warnings %q", len(c.Keys), c.Warnings)
	}
}

func TestWarnings(t *testing.T) {
	loose := writeFile(t, "keys", key+"\n", 0o644)
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"short key", []string{"--api-key-file", writeFile(t, "k", "short\n", 0o600)}, "shorter than 16"},
		{"readable key file", []string{"--api-key-file", loose}, "chmod 600"},
		{"open listener without key", []string{"--listen", "0.0.0.0"}, "without an API key"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := Load(tt.args, env(nil))
			if err != nil {
				t.Fatal(err)
			}
			if !hasWarning(c.Warnings, tt.want) {
				t.Errorf("warnings %q lack %q", c.Warnings, tt.want)
			}
		})
	}
	c, err := Load([]string{"--listen", "0.0.0.0", "--api-key-file", writeFile(t, "k", key, 0o600)}, env(nil))
	if err != nil || len(c.Warnings) != 0 {
		t.Errorf("open listener with a key: err %v, warnings %q", err, c.Warnings)
	}
}

func hasWarning(ws []string, sub string) bool {
	for _, w := range ws {
		if strings.Contains(w, sub) {
			return true
		}
	}
	return false
}

// TestErrorsAllAtOnce pins that every problem is reported in one go, each
// naming the flag or variable to fix.
func TestErrorsAllAtOnce(t *testing.T) {
	dir := t.TempDir()
	badKeys := writeFile(t, "bad", "good-key-good-key-1\nhas\x01control\n", 0o600)
	_, err := Load([]string{
		"--port", "70000",
		"--upstream", "ftp://x",
		"--max-upload-size", "0",
		"--log-format", "xml",
		"--log-level", "loud",
		"--api-key", "",
		"--tls-certfile", filepath.Join(dir, "missing.pem"),
		"--health-timeout", "0s",
		"--listen", "1.2.3.4:80",
	}, env(map[string]string{
		"COMFYGATE_PROTECT_WS":   "maybe",
		"COMFYGATE_API_KEY_FILE": badKeys,
	}))
	var cfgErr *Error
	if !errors.As(err, &cfgErr) {
		t.Fatalf("Load error = %v; want *Error", err)
	}
	want := []string{
		"COMFYGATE_PROTECT_WS: \"maybe\" is not a valid bool",
		"--listen: \"1.2.3.4:80\" is not a host name or IP address (give the port with --port)",
		"--port: must be between 1 and 65535, got 70000",
		"--upstream: scheme must be http or https, got \"ftp\"",
		"--max-upload-size: must be a positive number of MB, got 0",
		"--health-timeout: must be positive, got 0s",
		"--log-format: must be json or text, got \"xml\"",
		"--log-level: must be debug, info, warn or error, got \"loud\"",
		"--tls-keyfile: is required with --tls-certfile",
		"--api-key: key is empty",
		"COMFYGATE_API_KEY_FILE: " + badKeys + ": line 2: key contains a control character",
	}
	if len(cfgErr.Problems) != len(want) {
		t.Errorf("got %d problems, want %d:\n%s", len(cfgErr.Problems), len(want), err)
	}
	for i, w := range want {
		if i >= len(cfgErr.Problems) || !strings.HasPrefix(cfgErr.Problems[i], w) {
			t.Errorf("problem %d: want prefix %q\n%s", i, w, err)
		}
	}
	if strings.Contains(err.Error(), "control\x01") || strings.Contains(err.Error(), "has\x01") {
		t.Error("the error echoes a key")
	}
}

func TestKeyFileErrors(t *testing.T) {
	dir := t.TempDir()
	tests := []struct {
		name, path, want string
	}{
		{"missing", filepath.Join(dir, "nope"), "cannot read " + filepath.Join(dir, "nope") + ": no such file or directory"},
		{"directory", dir, "is a directory"},
		{"only comments", writeFile(t, "empty", "# nothing yet\n\n", 0o600), "holds no key"},
		{"unreadable", writeFile(t, "noperm", key, 0o000), "permission denied"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.name == "unreadable" && os.Geteuid() == 0 {
				t.Skip("root reads any file")
			}
			_, err := Load([]string{"--api-key-file", tt.path}, env(nil))
			if err == nil || !strings.Contains(err.Error(), "--api-key-file: ") || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %v; want --api-key-file and %q", err, tt.want)
			}
		})
	}
}

func TestHelpVersionAndArgs(t *testing.T) {
	if _, err := Load([]string{"--help"}, env(nil)); !errors.Is(err, ErrHelp) {
		t.Errorf("--help: %v", err)
	}
	if _, err := Load([]string{"--version"}, env(nil)); !errors.Is(err, ErrVersion) {
		t.Errorf("--version: %v", err)
	}
	var cfgErr *Error
	if _, err := Load([]string{"--no-such-flag"}, env(nil)); !errors.As(err, &cfgErr) || !strings.Contains(err.Error(), "no-such-flag") {
		t.Errorf("unknown flag: %v", err)
	}
	if _, err := Load([]string{"serve"}, env(nil)); !errors.As(err, &cfgErr) || !strings.Contains(err.Error(), `unexpected argument "serve"`) {
		t.Errorf("positional: %v", err)
	}
	var sb strings.Builder
	Usage(&sb)
	for _, f := range []string{"--api-key-file", "--protect-ws", "--tls-certfile", "--max-upload-size", "COMFYGATE_"} {
		if !strings.Contains(sb.String(), f) {
			t.Errorf("usage lacks %s", f)
		}
	}
}

// TestCheckConfigCreatesNothing: validating --audit-log must not create it.
func TestCheckConfigCreatesNothing(t *testing.T) {
	dir := t.TempDir()
	audit := filepath.Join(dir, "audit.log")
	if _, err := Load([]string{"--audit-log", audit, "--check-config"}, env(nil)); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(audit); !os.IsNotExist(err) {
		t.Errorf("validation created %s", audit)
	}
	if _, err := Load([]string{"--audit-log", filepath.Join(dir, "no", "such", "audit.log")}, env(nil)); err == nil || !strings.Contains(err.Error(), "--audit-log: the directory") {
		t.Errorf("missing directory: %v", err)
	}
}

func TestTLSFiles(t *testing.T) {
	cert, keyPEM := testcert.SelfSigned(t)
	certFile := writeFile(t, "cert.pem", string(cert), 0o600)
	keyFile := writeFile(t, "key.pem", string(keyPEM), 0o600)
	c, err := Load([]string{"--tls-certfile", certFile, "--tls-keyfile", keyFile}, env(nil))
	if err != nil || !c.TLS() {
		t.Fatalf("valid TLS files: %v", err)
	}
	_, err = Load([]string{"--tls-certfile", keyFile, "--tls-keyfile", certFile}, env(nil))
	if err == nil || !strings.Contains(err.Error(), "--tls-certfile: cannot load") {
		t.Errorf("swapped files: %v", err)
	}
}
