package config

import (
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/spf13/pflag"

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
	// Without a key the one warning is that authentication is off.
	if len(c.Warnings) != 1 || !strings.Contains(c.Warnings[0], "authentication is OFF") {
		t.Errorf("warnings = %q; want only that authentication is off", c.Warnings)
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
		{"open listener without key", []string{"--listen", "0.0.0.0"}, "authentication is OFF: listening on 0.0.0.0 without an API key, so anyone who can reach this port can use ComfyUI"},
		{"loopback without key", nil, "authentication is OFF: no API key is configured, so anyone who can reach 127.0.0.1:8188"},
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

// TestUnknownVariables pins issue #15 item 2: COMFYGATE_API_KEYFILE=keys.txt
// (one underscore short) used to start a gateway without a key. Every
// COMFYGATE_ variable that is no flag's now stops start-up, with the likely
// name, together with every other problem.
func TestUnknownVariables(t *testing.T) {
	keyFile := writeFile(t, "keys", key+"\n", 0o600)
	_, err := LoadEnviron([]string{"--port", "0"}, []string{
		"PATH=/usr/bin",
		"COMFYGATE_API_KEYFILE=" + keyFile,
		"COMFYGATE_UPSTREAMS=http://127.0.0.1:8189",
		"comfygate_protect_ws=true",
		"COMFYGATE_FROBNICATE=1",
		"COMFYGATE_URL=http://127.0.0.1:8188", // read by the example clients
		"COMFYGATE_TIMEOUT=20",
	})
	var cfgErr *Error
	if !errors.As(err, &cfgErr) {
		t.Fatalf("LoadEnviron error = %v; want *Error", err)
	}
	want := []string{
		"COMFYGATE_API_KEYFILE: unknown variable: did you mean COMFYGATE_API_KEY_FILE?",
		"COMFYGATE_UPSTREAMS: unknown variable: did you mean COMFYGATE_UPSTREAM?",
		"comfygate_protect_ws: variable names are upper case: did you mean COMFYGATE_PROTECT_WS?",
		"COMFYGATE_FROBNICATE: unknown variable: no comfygate flag is called --frobnicate",
		"--port: must be between 1 and 65535, got 0",
	}
	if len(cfgErr.Problems) != len(want) {
		t.Errorf("got %d problems, want %d:\n%v", len(cfgErr.Problems), len(want), err)
	}
	for i, w := range want {
		if i >= len(cfgErr.Problems) || !strings.HasPrefix(cfgErr.Problems[i], w) {
			t.Errorf("problem %d: want prefix %q\n%v", i, w, err)
		}
	}

	// The same environment through Load (a lookup function, which cannot
	// list names) is not checked: the callers that build one are tests.
	if _, err := Load(nil, env(map[string]string{"COMFYGATE_API_KEYFILE": keyFile})); err != nil {
		t.Errorf("Load: %v", err)
	}

	// An unknown flag gets the same help.
	_, err = LoadEnviron([]string{"--api-keyfile", keyFile}, nil)
	if err == nil || !strings.Contains(err.Error(), "unknown flag: --api-keyfile: did you mean --api-key-file?") {
		t.Errorf("unknown flag: %v", err)
	}
	// And an unknown variable is reported with it.
	_, err = LoadEnviron([]string{"--api-keyfile", keyFile}, []string{"COMFYGATE_LISTN=0.0.0.0"})
	if !errors.As(err, &cfgErr) || len(cfgErr.Problems) != 2 || !strings.Contains(err.Error(), "did you mean COMFYGATE_LISTEN?") {
		t.Errorf("unknown flag and variable: %v", err)
	}
}

// TestEveryFlagHasAKnownVariable: the known names come from the flag set,
// so a flag added later is known without another list to update.
func TestEveryFlagHasAKnownVariable(t *testing.T) {
	newFlagSet(&raw{}).VisitAll(func(f *pflag.Flag) {
		_, err := LoadEnviron(nil, []string{EnvName(f.Name) + "=" + f.DefValue})
		if err != nil && strings.Contains(err.Error(), "unknown variable") {
			t.Errorf("%s: %v", EnvName(f.Name), err)
		}
	})
	c, err := LoadEnviron(nil, []string{"COMFYGATE_PORT=9001", "COMFYGATE_URL=x"})
	if err != nil || c.Port != 9001 {
		t.Errorf("LoadEnviron does not read the environment: %v, %+v", err, c)
	}
	var sb strings.Builder
	Usage(&sb)
	for _, v := range ClientVariables {
		if !strings.Contains(sb.String(), v) {
			t.Errorf("--help does not say that %s is allowed", v)
		}
	}
}

// TestKubernetesServiceLinks: a Service named comfygate in the namespace
// gives every container COMFYGATE_SERVICE_HOST, COMFYGATE_PORT=tcp://… and
// more, unless the Pod sets enableServiceLinks: false. Say so.
func TestKubernetesServiceLinks(t *testing.T) {
	_, err := LoadEnviron(nil, []string{
		"COMFYGATE_SERVICE_HOST=10.0.0.1",
		"COMFYGATE_PORT_8188_TCP_ADDR=10.0.0.1",
		"COMFYGATE_METRICS_PORT=tcp://10.0.0.2:9188",
		"COMFYGATE_PORT=tcp://10.0.0.1:8188",
	})
	var cfgErr *Error
	if !errors.As(err, &cfgErr) || len(cfgErr.Problems) != 4 {
		t.Fatalf("error = %v; want 4 problems", err)
	}
	for i, svc := range []string{`"comfygate"`, `"comfygate"`, `"comfygate-metrics"`, `"comfygate"`} {
		if p := cfgErr.Problems[i]; !strings.Contains(p, "Kubernetes sets it for the Service "+svc) || !strings.Contains(p, "enableServiceLinks: false") {
			t.Errorf("problem %d = %q", i, p)
		}
	}
}

// TestMetricsListenNotTheMainAddress pins issue #15 item 8: --check-config
// accepted --metrics-listen on the main address, and start-up then failed
// with "address already in use".
func TestMetricsListenNotTheMainAddress(t *testing.T) {
	tests := []struct {
		args []string
		bad  bool
	}{
		{[]string{"--metrics-listen", "127.0.0.1:8188"}, true},
		{[]string{"--metrics-listen", "localhost:8188"}, true},
		{[]string{"--metrics-listen", "0.0.0.0:8188"}, true},
		{[]string{"--metrics-listen", ":8188"}, true},
		{[]string{"--listen", "0.0.0.0", "--metrics-listen", "127.0.0.1:8188"}, true},
		{[]string{"--port", "9000", "--metrics-listen", "127.0.0.1:9000"}, true},
		{[]string{"--listen", "127.0.0.1,::1", "--metrics-listen", "[::1]:8188"}, true},
		{[]string{"--metrics-listen", "127.0.0.1:9188"}, false},
		{[]string{"--metrics-listen", "[::1]:8188"}, false},
		{[]string{"--metrics-listen", "127.0.0.1:0"}, false},
		{[]string{"--listen", "192.0.2.1", "--metrics-listen", "127.0.0.1:8188"}, false},
	}
	for _, tt := range tests {
		_, err := Load(tt.args, env(nil))
		got := err != nil && strings.Contains(err.Error(), "--metrics-listen: ") && strings.Contains(err.Error(), "is taken by the main listener")
		if got != tt.bad {
			t.Errorf("%q: err %v; want refused %v", tt.args, err, tt.bad)
		}
	}
}

// TestKeyFilePermissions pins issue #15 item 8: a Kubernetes Secret mounted
// with defaultMode 0440 (group-readable, through fsGroup) got a chmod
// warning that cannot be followed there. Group read access is deliberate;
// access for everyone, or group write access, still warns.
func TestKeyFilePermissions(t *testing.T) {
	if runtime.GOOS == "windows" {
		t.Skip("no Unix mode bits")
	}
	for _, tt := range []struct {
		mode os.FileMode
		want string // "" for no warning
	}{
		{0o600, ""},
		{0o400, ""},
		{0o440, ""},
		{0o640, ""},
		{0o644, "can be read by every user of this machine (mode 0644)"},
		{0o604, "can be read by every user"},
		{0o660, "can be changed by its group (mode 0660)"},
		{0o666, "can be read by every user"},
		{0o602, "can be changed by every user of this machine (mode 0602)"},
	} {
		p := writeFile(t, "keys", key+"\n", 0o600)
		if err := os.Chmod(p, tt.mode); err != nil {
			t.Fatal(err)
		}
		c, err := Load([]string{"--api-key-file", p}, env(nil))
		if err != nil {
			t.Fatalf("mode %04o: %v", tt.mode, err)
		}
		switch {
		case tt.want == "" && len(c.Warnings) != 0:
			t.Errorf("mode %04o: unexpected warnings %q", tt.mode, c.Warnings)
		case tt.want != "" && !hasWarning(c.Warnings, tt.want):
			t.Errorf("mode %04o: warnings %q lack %q", tt.mode, c.Warnings, tt.want)
		}
	}
}

// TestKeyFileProblemsOnePerLine pins issue #15 item 5: start-up listed the
// bad lines of a key file joined by "; " on one line; it now lists them one
// per line, as comfygate keys check does.
func TestKeyFileProblemsOnePerLine(t *testing.T) {
	p := writeFile(t, "keys", "Bearer "+key+"\nalice: "+key+"\n", 0o600)
	_, err := Load([]string{"--api-key-file", p}, env(nil))
	var cfgErr *Error
	if !errors.As(err, &cfgErr) {
		t.Fatalf("err = %v", err)
	}
	want := []string{
		"--api-key-file: " + p + `: line 1: the line starts with "Bearer"`,
		"--api-key-file: " + p + `: line 2: read as the name "alice"`,
	}
	if len(cfgErr.Problems) != len(want) {
		t.Fatalf("problems:\n%v", err)
	}
	for i, w := range want {
		if !strings.HasPrefix(cfgErr.Problems[i], w) {
			t.Errorf("problem %d = %q; want prefix %q", i, cfgErr.Problems[i], w)
		}
	}
	if strings.Contains(err.Error(), key) {
		t.Error("the error echoes the key")
	}
}
