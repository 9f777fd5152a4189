// Package deploy has no code: its tests check the deployment files in this
// folder, offline, without a cluster or a Docker engine.
//
// TestKubernetes renders deploy/kubernetes with `kubectl kustomize` and
// checks that the objects fit together: two or more gateway replicas, each
// with --redis pointing at the Redis Service, probes, the key file from its
// Secret, the upstreams list from its ConfigMap, a PodDisruptionBudget that
// selects the gateway's Pods. TestCompose checks deploy/compose the same way.
// Both run the gateway's settings through comfygate's own configuration
// parser, so a misspelt flag or variable fails here rather than at start-up.
//
// YAML is decoded by python3's yaml module (the module has no YAML decoder
// of its own). Without kubectl or python3-yaml the tests skip, unless the
// environment variable CI is set: then they fail.
package deploy

import (
	"encoding/json"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/comfygate/comfygate/internal/config"
)

// need returns the path of a required program, or skips the test (fails it
// under CI) when it is missing.
func need(t *testing.T, program, why string) string {
	t.Helper()
	p, err := exec.LookPath(program)
	if err != nil {
		missing(t, fmt.Sprintf("%s not found (%s)", program, why))
	}
	return p
}

func missing(t *testing.T, msg string) {
	t.Helper()
	if os.Getenv("CI") != "" {
		t.Fatalf("%s; CI is set, so this is a failure", msg)
	}
	t.Skipf("%s; install it to run this test (under CI it is required)", msg)
}

// python returns a python3 that has the yaml module.
func python(t *testing.T) string {
	t.Helper()
	for _, p := range []string{"python3", "/usr/bin/python3"} {
		if exec.Command(p, "-c", "import yaml").Run() == nil {
			return p
		}
	}
	missing(t, "python3 with the yaml module (Debian: python3-yaml) not found; it decodes the YAML")
	return ""
}

const yamlToJSON = `import sys, json, yaml
json.dump([d for d in yaml.safe_load_all(sys.stdin) if d is not None], sys.stdout, default=str)`

// decode returns the YAML documents of data, as JSON would decode them.
func decode(t *testing.T, data []byte, what string) []map[string]any {
	t.Helper()
	cmd := exec.Command(python(t), "-c", yamlToJSON)
	cmd.Stdin = strings.NewReader(string(data))
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s is not valid YAML: %v\n%s", what, err, stderr.String())
	}
	var docs []map[string]any
	if err := json.Unmarshal(out, &docs); err != nil {
		t.Fatalf("%s: a document is not a mapping: %v", what, err)
	}
	return docs
}

// get walks obj along keys (string keys of maps, int indexes of lists).
func get(obj any, keys ...any) any {
	for _, k := range keys {
		switch k := k.(type) {
		case string:
			m, ok := obj.(map[string]any)
			if !ok {
				return nil
			}
			obj = m[k]
		case int:
			l, ok := obj.([]any)
			if !ok || k >= len(l) {
				return nil
			}
			obj = l[k]
		}
	}
	return obj
}

func str(obj any, keys ...any) string {
	s, _ := get(obj, keys...).(string)
	return s
}

func num(obj any, keys ...any) (int, bool) {
	switch v := get(obj, keys...).(type) {
	case float64:
		return int(v), true
	case string:
		n, err := strconv.Atoi(v)
		return n, err == nil
	}
	return 0, false
}

func list(obj any, keys ...any) []any {
	l, _ := get(obj, keys...).([]any)
	return l
}

func mapping(obj any, keys ...any) map[string]any {
	m, _ := get(obj, keys...).(map[string]any)
	return m
}

// matches reports whether labels carry every selector label.
func matches(selector, labels map[string]any) bool {
	if len(selector) == 0 {
		return false
	}
	for k, v := range selector {
		if labels[k] != v {
			return false
		}
	}
	return true
}

// flagValue returns the value of --name=VALUE or --name VALUE in args.
func flagValue(args []string, name string) (string, bool) {
	for i, a := range args {
		if v, ok := strings.CutPrefix(a, "--"+name+"="); ok {
			return v, true
		}
		if a == "--"+name && i+1 < len(args) {
			return args[i+1], true
		}
	}
	return "", false
}

func texts(l []any) []string {
	var out []string
	for _, v := range l {
		out = append(out, fmt.Sprint(v))
	}
	return out
}

// cluster indexes rendered Kubernetes objects by kind and name.
type cluster map[string]map[string]map[string]any

func (c cluster) obj(kind, name string) map[string]any { return c[kind][name] }

// workloads returns the Pod templates of the Deployments and StatefulSets.
func (c cluster) workloads() map[string]map[string]any {
	out := map[string]map[string]any{}
	for _, kind := range []string{"Deployment", "StatefulSet"} {
		for name, o := range c[kind] {
			out[kind+"/"+name] = o
		}
	}
	return out
}

// secretData returns the data of a Secret from secret.example.yaml.
func secretData(t *testing.T, secrets []map[string]any, name string) map[string]string {
	t.Helper()
	for _, s := range secrets {
		if str(s, "kind") == "Secret" && str(s, "metadata", "name") == name {
			out := map[string]string{}
			for k, v := range mapping(s, "stringData") {
				out[k] = fmt.Sprint(v)
			}
			return out
		}
	}
	t.Fatalf("secret.example.yaml has no Secret %q", name)
	return nil
}

func TestKubernetes(t *testing.T) {
	kubectl := need(t, "kubectl", "it renders the kustomization")
	python(t)
	cmd := exec.Command(kubectl, "kustomize", "kubernetes")
	var stderr strings.Builder
	cmd.Stderr = &stderr
	rendered, err := cmd.Output()
	if err != nil {
		t.Fatalf("kubectl kustomize deploy/kubernetes: %v\n%s", err, stderr.String())
	}
	c := cluster{}
	for _, o := range decode(t, rendered, "kubectl kustomize output") {
		kind, name := str(o, "kind"), str(o, "metadata", "name")
		if kind == "" || name == "" {
			t.Fatalf("an object without kind or name: %v", o)
		}
		if c[kind] == nil {
			c[kind] = map[string]map[string]any{}
		}
		if c[kind][name] != nil {
			t.Errorf("%s %s is defined twice", kind, name)
		}
		c[kind][name] = o
	}
	example, err := os.ReadFile("kubernetes/secret.example.yaml")
	if err != nil {
		t.Fatal(err)
	}
	secrets := decode(t, example, "secret.example.yaml")

	t.Run("kustomization lists every file", func(t *testing.T) {
		raw, err := os.ReadFile("kubernetes/kustomization.yaml")
		if err != nil {
			t.Fatal(err)
		}
		k := decode(t, raw, "kustomization.yaml")[0]
		listed := texts(list(k, "resources"))
		files, _ := filepath.Glob("kubernetes/*.yaml")
		for _, f := range files {
			base := filepath.Base(f)
			if base == "kustomization.yaml" || slices.Contains(listed, base) {
				continue
			}
			// Files left out on purpose are named in a comment there.
			if !strings.Contains(string(raw), base) {
				t.Errorf("%s is neither a resource of kustomization.yaml nor mentioned in it", base)
			}
		}
		for _, r := range listed {
			if _, err := os.Stat(filepath.Join("kubernetes", r)); err != nil {
				t.Errorf("kustomization.yaml lists %s: %v", r, err)
			}
		}
	})

	gw := c.obj("Deployment", "comfygate")
	if gw == nil {
		t.Fatal("no Deployment comfygate")
	}
	pod := mapping(gw, "spec", "template", "spec")
	podLabels := mapping(gw, "spec", "template", "metadata", "labels")
	selector := mapping(gw, "spec", "selector", "matchLabels")
	containers := list(pod, "containers")
	if len(containers) == 0 {
		t.Fatal("the gateway Pod has no containers")
	}

	t.Run("gateway Deployment", func(t *testing.T) {
		if n, _ := num(gw, "spec", "replicas"); n < 2 {
			t.Errorf("replicas = %v, want 2 or more", get(gw, "spec", "replicas"))
		}
		if !matches(selector, podLabels) {
			t.Errorf("the selector %v does not select the Pod template's labels %v", selector, podLabels)
		}
		if s := str(gw, "spec", "strategy", "type"); s == "Recreate" {
			t.Errorf("strategy Recreate stops every replica at once")
		}
		// COMFYGATE_PORT and friends from service links stop start-up.
		if v, ok := get(pod, "enableServiceLinks").(bool); !ok || v {
			t.Errorf("enableServiceLinks must be false: Services named comfygate* become COMFYGATE_* variables")
		}
		if v, _ := get(pod, "automountServiceAccountToken").(bool); v || get(pod, "automountServiceAccountToken") == nil {
			t.Errorf("automountServiceAccountToken must be false")
		}
		if str(pod, "securityContext", "seccompProfile", "type") != "RuntimeDefault" {
			t.Errorf("the Pod's seccomp profile is not RuntimeDefault")
		}
		for kind, w := range c.workloads() {
			if kind == "Deployment/comfygate" {
				continue
			}
			if matches(selector, mapping(w, "spec", "template", "metadata", "labels")) {
				t.Errorf("the gateway's selector %v also selects the Pods of %s", selector, kind)
			}
		}
	})

	for i := range containers {
		ctr := mapping(containers, i)
		name := str(ctr, "name")
		args := texts(list(ctr, "args"))
		t.Run("container "+name, func(t *testing.T) {
			checkGatewayContainer(t, c, secrets, gw, ctr, args)
		})
	}

	t.Run("PodDisruptionBudget", func(t *testing.T) {
		var found bool
		for name, pdb := range c["PodDisruptionBudget"] {
			sel := mapping(pdb, "spec", "selector", "matchLabels")
			if !matches(sel, podLabels) {
				continue
			}
			found = true
			min, ok := num(pdb, "spec", "minAvailable")
			replicas, _ := num(gw, "spec", "replicas")
			if !ok || min < 1 || min >= replicas {
				t.Errorf("PodDisruptionBudget %s: minAvailable %v, want at least 1 and fewer than the %d replicas", name, get(pdb, "spec", "minAvailable"), replicas)
			}
			for kind, w := range c.workloads() {
				if kind != "Deployment/comfygate" && matches(sel, mapping(w, "spec", "template", "metadata", "labels")) {
					t.Errorf("PodDisruptionBudget %s also selects the Pods of %s", name, kind)
				}
			}
		}
		if !found {
			t.Errorf("no PodDisruptionBudget selects the gateway's Pods %v", podLabels)
		}
	})

	t.Run("Services", func(t *testing.T) {
		for _, name := range []string{"comfygate", "comfygate-metrics"} {
			svc := c.obj("Service", name)
			if svc == nil {
				t.Errorf("no Service %s", name)
				continue
			}
			if !matches(mapping(svc, "spec", "selector"), podLabels) {
				t.Errorf("Service %s does not select the gateway's Pods", name)
			}
			for kind, w := range c.workloads() {
				if kind != "Deployment/comfygate" && matches(mapping(svc, "spec", "selector"), mapping(w, "spec", "template", "metadata", "labels")) {
					t.Errorf("Service %s also selects the Pods of %s", name, kind)
				}
			}
			for _, p := range list(svc, "spec", "ports") {
				if _, ok := containerPort(containers, get(p, "targetPort")); !ok {
					t.Errorf("Service %s: targetPort %v is no port of the gateway's containers", name, get(p, "targetPort"))
				}
			}
		}
	})

	t.Run("NetworkPolicies let only the gateway reach ComfyUI and Redis", func(t *testing.T) {
		for kind, w := range c.workloads() {
			if kind == "Deployment/comfygate" {
				continue
			}
			labels := mapping(w, "spec", "template", "metadata", "labels")
			var guarded bool
			for name, np := range c["NetworkPolicy"] {
				if !matches(mapping(np, "spec", "podSelector", "matchLabels"), labels) {
					continue
				}
				guarded = true
				for _, rule := range list(np, "spec", "ingress") {
					from := list(rule, "from")
					if len(from) == 0 {
						t.Errorf("NetworkPolicy %s lets everyone reach %s", name, kind)
					}
					for _, f := range from {
						if !matches(mapping(f, "podSelector", "matchLabels"), podLabels) || get(f, "namespaceSelector") != nil {
							t.Errorf("NetworkPolicy %s lets %v reach %s, not only the gateway", name, f, kind)
						}
					}
				}
			}
			if !guarded {
				t.Errorf("no NetworkPolicy selects the Pods of %s", kind)
			}
		}
	})
}

// containerPort resolves a probe's or Service's port (a name or a number)
// to a containerPort of containers.
func containerPort(containers []any, port any) (int, bool) {
	for i := range containers {
		for _, p := range list(containers, i, "ports") {
			n, _ := num(p, "containerPort")
			switch port := port.(type) {
			case string:
				if str(p, "name") == port {
					return n, true
				}
			case float64:
				if n == int(port) {
					return n, true
				}
			}
		}
	}
	return 0, false
}

// checkGatewayContainer checks one container of the gateway's Pod, then runs
// its arguments and environment through comfygate's configuration parser,
// with the Secrets (from secret.example.yaml) and ConfigMaps mounted as the
// kubelet would.
func checkGatewayContainer(t *testing.T, c cluster, secrets []map[string]any, gw map[string]any, ctr map[string]any, args []string) {
	pod := mapping(gw, "spec", "template", "spec")
	containers := list(pod, "containers")

	// The environment, with $(VAR) references filled in as Kubernetes does.
	env := map[string]string{}
	var envOrder []string
	secretRef := map[string][2]string{}
	expand := regexp.MustCompile(`\$\(([A-Za-z_][A-Za-z0-9_]*)\)`)
	for _, e := range list(ctr, "env") {
		name := str(e, "name")
		var v string
		switch {
		case get(e, "valueFrom", "secretKeyRef") != nil:
			sn, key := str(e, "valueFrom", "secretKeyRef", "name"), str(e, "valueFrom", "secretKeyRef", "key")
			secretRef[name] = [2]string{sn, key}
			val, ok := secretData(t, secrets, sn)[key]
			if !ok {
				t.Fatalf("env %s: Secret %s (secret.example.yaml) has no key %q", name, sn, key)
			}
			v = val
		default:
			v = expand.ReplaceAllStringFunc(str(e, "value"), func(ref string) string {
				n := expand.FindStringSubmatch(ref)[1]
				val, ok := env[n]
				if !ok {
					t.Errorf("env %s refers to $(%s), which is not defined before it", name, n)
				}
				return val
			})
		}
		env[name] = v
		envOrder = append(envOrder, name)
	}

	t.Run("--redis points at the Redis Service", func(t *testing.T) {
		// rawRedis keeps the $(VAR) references, raw has them filled in.
		rawRedis, fromFlag := flagValue(args, "redis")
		raw := expand.ReplaceAllStringFunc(rawRedis, func(ref string) string { return env[expand.FindStringSubmatch(ref)[1]] })
		if !fromFlag {
			rawRedis, raw = str(findEnv(ctr, "COMFYGATE_REDIS"), "value"), env["COMFYGATE_REDIS"]
		}
		if raw == "" {
			t.Fatal("neither --redis nor COMFYGATE_REDIS is set")
		}
		u, err := url.Parse(raw)
		if err != nil {
			t.Fatalf("the Redis URL does not parse: %v", err)
		}
		if u.Scheme != "redis" && u.Scheme != "rediss" {
			t.Errorf("the Redis URL's scheme is %q, want redis or rediss", u.Scheme)
		}
		svc := c.obj("Service", u.Hostname())
		if svc == nil {
			t.Fatalf("the Redis URL's host %q is no Service of the kustomization", u.Hostname())
		}
		port := u.Port()
		if port == "" {
			port = "6379"
		}
		var target any
		for _, p := range list(svc, "spec", "ports") {
			if n, _ := num(p, "port"); strconv.Itoa(n) == port {
				target = get(p, "targetPort")
				if target == nil {
					target = get(p, "port")
				}
			}
		}
		if target == nil {
			t.Fatalf("Service %s has no port %s", u.Hostname(), port)
		}
		// The Redis behind the Service: exactly one StatefulSet, one replica.
		var redis []string
		for kind, w := range c.workloads() {
			if !matches(mapping(svc, "spec", "selector"), mapping(w, "spec", "template", "metadata", "labels")) {
				continue
			}
			redis = append(redis, kind)
			if n, _ := num(w, "spec", "replicas"); n != 1 {
				t.Errorf("%s behind the Redis Service has %d replicas: two Redis servers behind one Service would split the shared state", kind, n)
			}
			rctrs := list(w, "spec", "template", "spec", "containers")
			if _, ok := containerPort(rctrs, target); !ok {
				t.Errorf("the Redis Service's targetPort %v is no port of %s", target, kind)
			}
			// The password the gateway sends is the one Redis requires.
			pw, hasPW := u.User.Password()
			for i := range rctrs {
				rargs := texts(list(rctrs, i, "args"))
				req, ok := flagValue(rargs, "requirepass")
				if !ok {
					if hasPW {
						t.Errorf("the gateway sends a Redis password, but %s is not started with --requirepass", kind)
					}
					continue
				}
				m := expand.FindStringSubmatch(req)
				if m == nil {
					t.Errorf("%s: --requirepass %q is not taken from a Secret", kind, req)
					continue
				}
				var ref [2]string
				for _, e := range list(rctrs, i, "env") {
					if str(e, "name") == m[1] {
						ref = [2]string{str(e, "valueFrom", "secretKeyRef", "name"), str(e, "valueFrom", "secretKeyRef", "key")}
					}
				}
				var gwRef [2]string
				for _, m := range expand.FindAllStringSubmatch(rawRedis, -1) {
					if r, ok := secretRef[m[1]]; ok {
						gwRef = r
					}
				}
				if ref == ([2]string{}) || ref != gwRef {
					t.Errorf("Redis takes its password from Secret key %v, the gateway's --redis URL from %v", ref, gwRef)
				}
				if !hasPW || pw == "" {
					t.Errorf("Redis requires a password, and the gateway's URL has none")
				}
			}
		}
		if len(redis) != 1 {
			t.Errorf("the Redis Service selects %v, want exactly one workload", redis)
		}
	})

	t.Run("probes", func(t *testing.T) {
		portFlag, _ := flagValue(args, "port")
		metricsFlag, _ := flagValue(args, "metrics-listen")
		for probe, want := range map[string]string{"readinessProbe": "/health/ready", "livenessProbe": "/health/live", "startupProbe": "/health/live"} {
			p := mapping(ctr, probe)
			if p == nil {
				t.Errorf("no %s", probe)
				continue
			}
			if got := str(p, "httpGet", "path"); got != want {
				t.Errorf("%s: path %q, want %q", probe, got, want)
			}
			n, ok := containerPort(containers, get(p, "httpGet", "port"))
			if !ok {
				t.Errorf("%s: port %v is no port of the container", probe, get(p, "httpGet", "port"))
			} else if strconv.Itoa(n) != portFlag && !strings.HasSuffix(metricsFlag, ":"+strconv.Itoa(n)) {
				t.Errorf("%s: port %d is neither --port (%s) nor --metrics-listen (%s)", probe, n, portFlag, metricsFlag)
			}
		}
	})

	// Files, mounted as the kubelet would: each volumeMount's directory gets
	// the keys of its Secret (from secret.example.yaml) or ConfigMap.
	root := t.TempDir()
	mounts := map[string]map[string]any{} // mountPath -> volume
	for _, m := range list(ctr, "volumeMounts") {
		var vol map[string]any
		for _, v := range list(pod, "volumes") {
			if str(v, "name") == str(m, "name") {
				vol = mapping(v)
			}
		}
		if vol == nil {
			t.Fatalf("volumeMount %s: no such volume", str(m, "name"))
		}
		if get(m, "subPath") != nil {
			t.Errorf("volumeMount %s uses subPath, which never sees Secret or ConfigMap updates (no hot reload)", str(m, "name"))
		}
		dir := filepath.Join(root, str(m, "mountPath"))
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		var data map[string]string
		switch {
		case get(vol, "secret") != nil:
			data = secretData(t, secrets, str(vol, "secret", "secretName"))
		case get(vol, "configMap") != nil:
			cm := c.obj("ConfigMap", str(vol, "configMap", "name"))
			if cm == nil {
				t.Fatalf("volume %s: ConfigMap %s is not in the kustomization", str(vol, "name"), str(vol, "configMap", "name"))
			}
			data = map[string]string{}
			for k, v := range mapping(cm, "data") {
				data[k] = fmt.Sprint(v)
			}
		}
		for k, v := range data {
			// 0600: the Pod's fsGroup gives comfygate the group; here the
			// test's own user reads it, without a permission warning.
			if err := os.WriteFile(filepath.Join(dir, k), []byte(v), 0o600); err != nil {
				t.Fatal(err)
			}
		}
		mounts[str(m, "mountPath")] = vol
	}
	mounted := func(t *testing.T, flag, kind string) (file string, vol map[string]any) {
		t.Helper()
		p, ok := flagValue(args, flag)
		if !ok {
			t.Fatalf("--%s is not set", flag)
		}
		vol = mounts[path.Dir(p)]
		if vol == nil {
			t.Fatalf("--%s=%s: its directory %s is not a volumeMount (mount the directory, so updates are seen)", flag, p, path.Dir(p))
		}
		if get(vol, kind) == nil {
			t.Fatalf("--%s=%s: the volume %s is not a %s", flag, p, str(vol, "name"), kind)
		}
		if _, err := os.Stat(filepath.Join(root, p)); err != nil {
			t.Fatalf("--%s=%s: the %s has no key %q", flag, p, kind, path.Base(p))
		}
		return filepath.Join(root, p), vol
	}

	t.Run("--api-key-file from a Secret", func(t *testing.T) {
		mounted(t, "api-key-file", "secret")
	})

	t.Run("--upstreams-file from a ConfigMap", func(t *testing.T) {
		file, _ := mounted(t, "upstreams-file", "configMap")
		text, _ := os.ReadFile(file)
		specs, problems := config.ParseUpstreams(text)
		if len(problems) > 0 || len(specs) == 0 {
			t.Fatalf("the upstreams list does not parse: %v (%d servers)", problems, len(specs))
		}
		// Entries POD.SERVICE name a Pod of a StatefulSet behind a headless
		// Service; the shipped list names each of its Pods.
		perSet := map[string]int{}
		for _, s := range specs {
			host, port := s.URL.Hostname(), s.URL.Port()
			podName, svcName, ok := strings.Cut(host, ".")
			i := strings.LastIndex(podName, "-")
			if !ok || i < 0 {
				t.Errorf("upstream %s: %s is not POD.SERVICE", s.Name, host)
				continue
			}
			setName := podName[:i]
			ordinal, err := strconv.Atoi(podName[i+1:])
			sts := c.obj("StatefulSet", setName)
			if err != nil || sts == nil {
				t.Errorf("upstream %s: no StatefulSet %s for Pod %s", s.Name, setName, podName)
				continue
			}
			if str(sts, "spec", "serviceName") != svcName {
				t.Errorf("upstream %s: StatefulSet %s's serviceName is %q, not %q", s.Name, setName, str(sts, "spec", "serviceName"), svcName)
			}
			replicas, _ := num(sts, "spec", "replicas")
			if ordinal >= replicas {
				t.Errorf("upstream %s: Pod %s does not exist with %d replicas", s.Name, podName, replicas)
			}
			perSet[setName]++
			svc := c.obj("Service", svcName)
			if svc == nil || str(svc, "spec", "clusterIP") != "None" {
				t.Errorf("upstream %s: Service %s is missing or not headless (Pods get DNS names only from a headless Service)", s.Name, svcName)
				continue
			}
			if !matches(mapping(svc, "spec", "selector"), mapping(sts, "spec", "template", "metadata", "labels")) {
				t.Errorf("Service %s does not select StatefulSet %s's Pods", svcName, setName)
			}
			n, _ := strconv.Atoi(port)
			if _, ok := containerPort(list(sts, "spec", "template", "spec", "containers"), float64(n)); !ok {
				t.Errorf("upstream %s: port %s is no port of StatefulSet %s's containers", s.Name, port, setName)
			}
		}
		for name, n := range perSet {
			if replicas, _ := num(c.obj("StatefulSet", name), "spec", "replicas"); n != replicas {
				t.Errorf("the upstreams list names %d Pods of StatefulSet %s, which has %d replicas", n, name, replicas)
			}
		}
	})

	t.Run("security context", func(t *testing.T) {
		sc := mapping(ctr, "securityContext")
		for _, k := range []string{"runAsNonRoot", "readOnlyRootFilesystem"} {
			if v, _ := get(sc, k).(bool); !v {
				t.Errorf("securityContext.%s is not true", k)
			}
		}
		if v, ok := get(sc, "allowPrivilegeEscalation").(bool); !ok || v {
			t.Errorf("securityContext.allowPrivilegeEscalation is not false")
		}
		if !slices.Contains(texts(list(sc, "capabilities", "drop")), "ALL") {
			t.Errorf("securityContext.capabilities.drop does not hold ALL")
		}
	})

	t.Run("comfygate accepts the settings", func(t *testing.T) {
		var argv []string
		for _, a := range args {
			argv = append(argv, remap(a, mounts, root))
		}
		var environ []string
		for _, k := range envOrder {
			environ = append(environ, k+"="+remap(env[k], mounts, root))
		}
		cfg, err := config.LoadEnviron(argv, environ)
		if err != nil {
			t.Fatalf("comfygate refuses the container's settings: %v", err)
		}
		if cfg.Redis == nil || !cfg.Fleet() || !cfg.AuthEnabled() || cfg.MetricsListen == "" {
			t.Errorf("want --redis, a fleet, keys and --metrics-listen; got redis=%v fleet=%v keys=%d metrics=%q",
				cfg.Redis != nil, cfg.Fleet(), len(cfg.Keys), cfg.MetricsListen)
		}
		grace, _ := num(pod, "terminationGracePeriodSeconds")
		pause, _ := num(ctr, "lifecycle", "preStop", "sleep", "seconds")
		if time.Duration(grace)*time.Second <= cfg.ShutdownTimeout+time.Duration(pause)*time.Second {
			t.Errorf("terminationGracePeriodSeconds %d is not longer than the preStop pause (%ds) plus --shutdown-timeout (%v)", grace, pause, cfg.ShutdownTimeout)
		}
	})
}

func findEnv(ctr map[string]any, name string) map[string]any {
	for _, e := range list(ctr, "env") {
		if str(e, "name") == name {
			return mapping(e)
		}
	}
	return nil
}

// remap points paths under a mount at the test's copy of it.
func remap(s string, mounts map[string]map[string]any, root string) string {
	for m := range mounts {
		if i := strings.Index(s, m+"/"); i >= 0 {
			return s[:i] + filepath.Join(root, s[i:])
		}
	}
	return s
}

func TestCompose(t *testing.T) {
	python(t)
	raw, err := os.ReadFile("compose/compose.yaml")
	if err != nil {
		t.Fatal(err)
	}
	docs := decode(t, raw, "compose.yaml")
	if len(docs) != 1 {
		t.Fatalf("compose.yaml holds %d documents, want 1", len(docs))
	}
	doc := docs[0]
	services := mapping(doc, "services")
	networks := mapping(doc, "networks")

	envOf := func(svc map[string]any) map[string]string {
		out := map[string]string{}
		switch e := get(svc, "environment").(type) {
		case map[string]any:
			for k, v := range e {
				out[k] = fmt.Sprint(v)
			}
		case []any:
			for _, kv := range e {
				k, v, _ := strings.Cut(fmt.Sprint(kv), "=")
				out[k] = v
			}
		}
		return out
	}
	netsOf := func(svc map[string]any) []string {
		if m := mapping(svc, "networks"); m != nil {
			var out []string
			for k := range m {
				out = append(out, k)
			}
			return out
		}
		return texts(list(svc, "networks"))
	}
	shareNetwork := func(a, b map[string]any) bool {
		for _, n := range netsOf(a) {
			if slices.Contains(netsOf(b), n) {
				return true
			}
		}
		return false
	}

	// Which services are what, by how they are built.
	var gateways, sims []string
	for name := range services {
		svc := mapping(services, name)
		if str(svc, "build", "dockerfile") != "deploy/docker/Dockerfile" {
			continue
		}
		if str(svc, "build", "context") != "../.." {
			t.Errorf("%s: build context %q, want the repository root (../..)", name, str(svc, "build", "context"))
		}
		switch str(svc, "build", "target") {
		case "":
			gateways = append(gateways, name)
		case "comfyui-sim":
			sims = append(sims, name)
		default:
			t.Errorf("%s: unknown build target %q", name, str(svc, "build", "target"))
		}
	}
	slices.Sort(gateways)
	if len(gateways) < 2 {
		t.Fatalf("gateway services %v, want 2 or more", gateways)
	}
	if len(sims) < 2 {
		t.Errorf("simulator services %v, want 2 or more", sims)
	}

	t.Run("Dockerfile targets", func(t *testing.T) {
		df, err := os.ReadFile("docker/Dockerfile")
		if err != nil {
			t.Fatal(err)
		}
		var froms []string
		for _, line := range strings.Split(string(df), "\n") {
			if strings.HasPrefix(strings.ToUpper(line), "FROM ") {
				froms = append(froms, line)
			}
		}
		if !slices.ContainsFunc(froms, func(l string) bool { return strings.HasSuffix(l, " AS comfyui-sim") }) {
			t.Errorf("deploy/docker/Dockerfile has no stage comfyui-sim")
		}
		last := string(df)[strings.LastIndex(string(df), froms[len(froms)-1]):]
		if !strings.Contains(last, `ENTRYPOINT ["/usr/local/bin/comfygate"]`) {
			t.Errorf("the Dockerfile's last stage (its default target) is not comfygate's")
		}
	})

	t.Run("simulators", func(t *testing.T) {
		src, err := os.ReadFile("../cmd/comfyui-sim/main.go")
		if err != nil {
			t.Fatal(err)
		}
		for _, name := range sims {
			svc := mapping(services, name)
			for _, a := range texts(list(svc, "command")) {
				if f, ok := strings.CutPrefix(a, "--"); ok {
					f, _, _ = strings.Cut(f, "=")
					if !strings.Contains(string(src), `"`+f+`"`) {
						t.Errorf("%s: comfyui-sim has no flag --%s", name, f)
					}
				}
			}
			if get(svc, "ports") != nil {
				t.Errorf("%s publishes ports: only the load balancer should be reachable", name)
			}
		}
	})

	var redisSvc string
	for name := range services {
		if strings.HasPrefix(str(services, name, "image"), "redis:") {
			redisSvc = name
		}
	}
	if redisSvc == "" {
		t.Fatal("no redis service")
	}

	for _, name := range gateways {
		svc := mapping(services, name)
		env := envOf(svc)
		t.Run(name, func(t *testing.T) {
			u, err := url.Parse(env["COMFYGATE_REDIS"])
			if err != nil || u.Hostname() != redisSvc || (u.Port() != "" && u.Port() != "6379") {
				t.Errorf("COMFYGATE_REDIS = %q, want the %s service", env["COMFYGATE_REDIS"], redisSvc)
			}
			if !shareNetwork(svc, mapping(services, redisSvc)) {
				t.Errorf("%s and %s share no network", name, redisSvc)
			}
			var servers []string
			for _, v := range strings.Split(env["COMFYGATE_UPSTREAM"], ",") {
				spec, err := config.ParseUpstream(v)
				if err != nil {
					t.Errorf("COMFYGATE_UPSTREAM: %v", err)
					continue
				}
				host := spec.URL.Hostname()
				servers = append(servers, host)
				sim := mapping(services, host)
				if !slices.Contains(sims, host) {
					t.Errorf("upstream %s is not a simulator service", host)
					continue
				}
				if p, _ := flagValue(texts(list(sim, "command")), "port"); p != spec.URL.Port() {
					t.Errorf("upstream %s: port %s, but the simulator listens on %q", host, spec.URL.Port(), p)
				}
				if !shareNetwork(svc, sim) {
					t.Errorf("%s and %s share no network", name, host)
				}
			}
			slices.Sort(servers)
			slices.Sort(sims)
			if !slices.Equal(servers, sims) {
				t.Errorf("upstreams %v, want every simulator %v", servers, sims)
			}

			// The key file: a read-only bind of ./keys that must exist.
			keyFile := env["COMFYGATE_API_KEY_FILE"]
			var bound bool
			for _, v := range list(svc, "volumes") {
				if str(v, "target") != path.Dir(keyFile) {
					continue
				}
				bound = true
				if str(v, "type") != "bind" || str(v, "source") != "./keys" {
					t.Errorf("the key folder is not a bind of ./keys: %v", v)
				}
				if ro, _ := get(v, "read_only").(bool); !ro {
					t.Errorf("the key folder is not read-only")
				}
				if c, ok := get(v, "bind", "create_host_path").(bool); !ok || c {
					t.Errorf("bind.create_host_path must be false, or a missing ./keys becomes an empty folder")
				}
			}
			if !bound {
				t.Errorf("COMFYGATE_API_KEY_FILE=%s: its folder is not mounted", keyFile)
			}
			for _, p := range texts(list(svc, "ports")) {
				if !strings.HasPrefix(p, "127.0.0.1:") || !strings.HasSuffix(p, ":9188") {
					t.Errorf("%s publishes %s: only the metrics port, on loopback", name, p)
				}
			}
			if d, err := time.ParseDuration(str(svc, "stop_grace_period")); err != nil || d <= 15*time.Second {
				t.Errorf("stop_grace_period %q is not longer than --shutdown-timeout (15s)", str(svc, "stop_grace_period"))
			}

			// The image's CMD (--listen 0.0.0.0) and this environment, through
			// comfygate's parser, with a key file where the mount puts one.
			dir := t.TempDir()
			file := filepath.Join(dir, path.Base(keyFile))
			if err := os.WriteFile(file, []byte("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\n"), 0o600); err != nil {
				t.Fatal(err)
			}
			var environ []string
			for k, v := range env {
				if k == "COMFYGATE_API_KEY_FILE" {
					v = file
				}
				environ = append(environ, k+"="+v)
			}
			cfg, err := config.LoadEnviron([]string{"--listen", "0.0.0.0"}, environ)
			if err != nil {
				t.Fatalf("comfygate refuses %s's settings: %v", name, err)
			}
			if cfg.Redis == nil || !cfg.Fleet() || !cfg.AuthEnabled() || !strings.HasSuffix(cfg.MetricsListen, ":9188") {
				t.Errorf("want --redis, a fleet, keys and metrics on 9188")
			}
		})
	}

	t.Run("networks", func(t *testing.T) {
		internal := ""
		for name := range networks {
			if v, _ := get(networks, name, "internal").(bool); v {
				internal = name
			}
		}
		if internal == "" {
			t.Fatal("no internal network for Redis and the simulators")
		}
		for _, name := range append([]string{redisSvc}, sims...) {
			if n := netsOf(mapping(services, name)); !slices.Equal(n, []string{internal}) {
				t.Errorf("%s is on networks %v, want only %s", name, n, internal)
			}
		}
		for name := range services {
			for _, n := range netsOf(mapping(services, name)) {
				if _, ok := networks[n]; !ok {
					t.Errorf("%s uses network %s, which is not declared", name, n)
				}
			}
		}
	})

	t.Run("load balancer", func(t *testing.T) {
		var lb string
		for name := range services {
			if strings.HasPrefix(str(services, name, "image"), "haproxy:") {
				lb = name
			}
		}
		if lb == "" {
			t.Fatal("no haproxy service")
		}
		svc := mapping(services, lb)
		if p := texts(list(svc, "ports")); !slices.Equal(p, []string{"127.0.0.1:8188:8188"}) {
			t.Errorf("%s publishes %v, want 127.0.0.1:8188:8188", lb, p)
		}
		if slices.Contains(netsOf(svc), "internal") {
			t.Errorf("%s is on the internal network", lb)
		}
		var cfgPath string
		for _, v := range list(svc, "volumes") {
			if str(v, "target") == "/usr/local/etc/haproxy/haproxy.cfg" {
				cfgPath = filepath.Join("compose", str(v, "source"))
			}
		}
		if cfgPath == "" {
			t.Fatal("haproxy.cfg is not mounted")
		}
		text, err := os.ReadFile(cfgPath)
		if err != nil {
			t.Fatal(err)
		}
		var servers []string
		directives := map[string]bool{}
		for _, line := range strings.Split(string(text), "\n") {
			f := strings.Fields(line)
			if len(f) == 0 || strings.HasPrefix(f[0], "#") {
				continue
			}
			directives[strings.Join(f[:min(2, len(f))], " ")] = true
			if f[0] == "server" && len(f) >= 3 {
				host, port, err := net.SplitHostPort(f[2])
				if err != nil || port != "8188" {
					t.Errorf("haproxy.cfg: server %s: %q, want NAME:8188", f[1], f[2])
				}
				if !shareNetwork(svc, mapping(services, host)) {
					t.Errorf("haproxy.cfg: server %s is not a service on the load balancer's network", host)
				}
				servers = append(servers, host)
			}
		}
		slices.Sort(servers)
		if !slices.Equal(servers, gateways) {
			t.Errorf("haproxy.cfg balances over %v, want every gateway %v", servers, gateways)
		}
		for _, d := range []string{"balance roundrobin", "timeout tunnel", "option forwardfor", "bind :8188", "mode http"} {
			if !directives[d] {
				t.Errorf("haproxy.cfg has no %q", d)
			}
		}
		haproxy, err := exec.LookPath("haproxy")
		if err != nil {
			t.Logf("haproxy not installed: its own check (haproxy -c) is skipped")
			return
		}
		out, err := exec.Command(haproxy, "-c", "-f", cfgPath).CombinedOutput()
		if err != nil {
			t.Errorf("haproxy -c -f %s: %v\n%s", cfgPath, err, out)
		}
	})
}
