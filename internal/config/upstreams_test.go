package config

import (
	"strings"
	"testing"
)

func TestUpstreams(t *testing.T) {
	names := func(c *Config) string {
		var out []string
		for _, u := range c.Upstreams {
			out = append(out, u.Name+"="+u.URL.String())
		}
		return strings.Join(out, " ")
	}
	file := writeFile(t, "ups", "# the fleet\ngpu1=http://10.0.0.1:8188\nhttp://10.0.0.2:8188/ drain # leaving\n\n", 0o644)
	cases := []struct {
		name string
		args []string
		env  map[string]string
		want string
	}{
		{"default", nil, nil, "127.0.0.1:8189=http://127.0.0.1:8189"},
		{"one, named", []string{"--upstream", "big=http://127.0.0.1:9000/"}, nil, "big=http://127.0.0.1:9000"},
		{"repeated", []string{"--upstream", "a=http://127.0.0.1:9000", "--upstream", "http://127.0.0.1:9001"}, nil,
			"a=http://127.0.0.1:9000 127.0.0.1:9001=http://127.0.0.1:9001"},
		{"comma-separated variable", nil, map[string]string{"COMFYGATE_UPSTREAM": "a=http://127.0.0.1:9000,b=http://127.0.0.1:9001"}, "a=http://127.0.0.1:9000 b=http://127.0.0.1:9001"},
		{"file", []string{"--upstreams-file", file}, nil, "gpu1=http://10.0.0.1:8188 10.0.0.2:8188=http://10.0.0.2:8188"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c, err := Load(tc.args, env(tc.env))
			if err != nil {
				t.Fatal(err)
			}
			if got := names(c); got != tc.want {
				t.Errorf("upstreams %q; want %q", got, tc.want)
			}
			if c.Upstream.String() != c.Upstreams[0].URL.String() {
				t.Errorf("Upstream %s is not the first of Upstreams", c.Upstream)
			}
			if fleet := len(c.Upstreams) > 1 || tc.name == "file"; c.Fleet() != fleet {
				t.Errorf("Fleet() = %v; want %v", c.Fleet(), fleet)
			}
		})
	}
	c, _ := Load([]string{"--upstreams-file", file}, env(nil))
	if !c.Upstreams[1].Drain || c.Upstreams[0].Drain {
		t.Errorf("drain flags %v, %v; want false, true", c.Upstreams[0].Drain, c.Upstreams[1].Drain)
	}
}

func TestUpstreamProblems(t *testing.T) {
	bad := writeFile(t, "ups", "gpu1=http://10.0.0.1:8188\ngpu1=http://10.0.0.2:8188\nftp://x\nhttp://a b c\n", 0o644)
	empty := writeFile(t, "empty", "# nothing\n", 0o644)
	cases := []struct {
		name string
		args []string
		want []string
	}{
		{"itself", []string{"--upstream", "http://localhost:8188"}, []string{"comfygate's own address"}},
		{"itself on every interface", []string{"--listen", "0.0.0.0", "--port", "9999", "--upstream", "http://127.0.0.1:9999"}, []string{"comfygate's own address"}},
		{"bad and duplicate names", []string{"--upstream", "a=http://127.0.0.1:1", "--upstream", "a=http://127.0.0.1:2", "--upstream", "b c=http://x"},
			[]string{`server name "a" is used twice`, "not a valid server name"}},
		{"file lines", []string{"--upstreams-file", bad}, []string{"line 3: scheme must be http or https", "line 4: want URL or NAME=URL", `"gpu1" is used twice`}},
		{"empty file", []string{"--upstreams-file", empty}, []string{"lists no server"}},
		{"both", []string{"--upstreams-file", empty, "--upstream", "http://127.0.0.1:1"}, []string{"not both"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Load(tc.args, env(nil))
			if err == nil {
				t.Fatal("loaded; want an error")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not say %q", err, w)
				}
			}
		})
	}
	// Another port of this machine is ComfyUI's, not comfygate's.
	if _, err := Load([]string{"--upstream", "http://localhost:8189"}, env(nil)); err != nil {
		t.Errorf("ComfyUI on 8189: %v", err)
	}
}
