package config

import (
	"errors"
	"strings"
	"testing"
)

func TestRedisURL(t *testing.T) {
	tests := []struct {
		name    string
		args    []string
		env     map[string]string
		want    string // the URL as logged; "" for none
		db      int
		tls     bool
		problem string // a part of the error; "" for none
	}{
		{name: "unset"},
		{name: "plain", args: []string{"--redis", "redis://redis:6379"}, want: "redis://redis:6379"},
		{name: "password and db", args: []string{"--redis", "redis://:s3cret@10.0.0.5:6380/2"}, want: "redis://:xxxxx@10.0.0.5:6380/2", db: 2},
		{name: "user and TLS", args: []string{"--redis", "rediss://comfygate:s3cret@redis.example:6380/0"}, want: "rediss://comfygate:xxxxx@redis.example:6380/0", tls: true},
		{name: "env", env: map[string]string{"COMFYGATE_REDIS": "redis://:s3cret@redis/1"}, want: "redis://:xxxxx@redis/1", db: 1},
		{name: "options", args: []string{"--redis", "redis://redis?dial_timeout=3s&read_timeout=2s"}, want: "redis://redis?dial_timeout=3s&read_timeout=2s"},
		{name: "scheme", args: []string{"--redis", "http://:s3cret@redis:6379"}, problem: `--redis: scheme must be redis or rediss (TLS), got "http"`},
		{name: "no host", args: []string{"--redis", "redis://:s3cret@/0"}, problem: "--redis: no host"},
		{name: "bad db", args: []string{"--redis", "redis://:s3cret@redis/zero"}, problem: `--redis: invalid database number: "zero"`},
		{name: "bad port", args: []string{"--redis", "redis://:s3cret@redis:port/0"}, problem: "--redis: not a URL"},
		{name: "unknown option", args: []string{"--redis", "redis://redis?timeout=1s"}, problem: "--redis: unexpected option: timeout"},
		{name: "empty env", env: map[string]string{"COMFYGATE_REDIS": ""}, problem: "COMFYGATE_REDIS: is empty"},
		{name: "unix socket", args: []string{"--redis", "unix:///run/redis.sock"}, problem: `got "unix"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := Load(tt.args, env(tt.env))
			if tt.problem != "" {
				var cfgErr *Error
				if !errors.As(err, &cfgErr) || !strings.Contains(err.Error(), tt.problem) {
					t.Fatalf("error = %v; want one containing %q", err, tt.problem)
				}
				if strings.Contains(err.Error(), "s3cret") {
					t.Errorf("the error quotes the password: %v", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if tt.want == "" {
				if c.Redis != nil {
					t.Errorf("Redis = %v; want nil (in memory)", c.Redis)
				}
				return
			}
			if c.Redis == nil || c.Redis.String() != tt.want || c.Redis.DB() != tt.db || c.Redis.TLS() != tt.tls {
				t.Fatalf("Redis = %v; want %s, db %d, TLS %v", c.Redis, tt.want, tt.db, tt.tls)
			}
			o := c.Redis.Options()
			if raw := strings.Join(tt.args, " ") + tt.env["COMFYGATE_REDIS"]; strings.Contains(raw, "s3cret") && o.Password != "s3cret" {
				t.Errorf("password %q not passed to the client", o.Password)
			}
			if o.ReadTimeout <= 0 || o.DialTimeout <= 0 || o.PoolTimeout <= 0 {
				t.Errorf("unbounded client: %+v", o)
			}
			warned := strings.Contains(strings.Join(c.Warnings, "\n"), "--redis on the command line shows its password")
			if want := len(tt.args) > 0 && strings.Contains(tt.args[1], "s3cret"); warned != want {
				t.Errorf("password warning %v; want %v (%q)", warned, want, c.Warnings)
			}
		})
	}
}
