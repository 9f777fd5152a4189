package config

import (
	"bufio"
	"bytes"
	"fmt"
	"net"
	"net/url"
	"os"
	"regexp"
	"strconv"
	"strings"
)

// UpstreamSpec is one ComfyUI server: --upstream URL or NAME=URL, or a line
// of --upstreams-file.
type UpstreamSpec struct {
	// Name identifies the server in logs, metrics and /health; the URL's
	// host:port when not given.
	Name string
	URL  *url.URL
	// Drain (upstreams file only) keeps the server out of new work; it
	// leaves the fleet when its queue is empty.
	Drain bool
}

// validName is what a server's name may hold: it appears in metrics
// labels, logs, and the subfolder of the files the fleet serves.
var validName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$`)

// ParseUpstream reads "URL" or "NAME=URL".
func ParseUpstream(s string) (UpstreamSpec, error) {
	s = strings.TrimSpace(s)
	var spec UpstreamSpec
	if name, rest, ok := strings.Cut(s, "="); ok && !strings.ContainsAny(name, ":/") {
		if !validName.MatchString(name) {
			return spec, fmt.Errorf("%q is not a valid server name (letters, digits, '.', '_', '-'; up to 64)", name)
		}
		spec.Name, s = name, rest
	}
	u, err := url.Parse(s)
	switch {
	case err != nil:
		return spec, fmt.Errorf("not a URL: %v", err)
	case u.Scheme != "http" && u.Scheme != "https":
		return spec, fmt.Errorf("scheme must be http or https, got %q (example: http://127.0.0.1:8189)", u.Scheme)
	case u.Host == "":
		return spec, fmt.Errorf("no host in %q (example: http://127.0.0.1:8189)", s)
	case u.User != nil || u.RawQuery != "" || u.Fragment != "":
		return spec, fmt.Errorf("must be a base URL without user info, query or fragment")
	}
	u.Path = strings.TrimSuffix(u.Path, "/")
	u.RawPath = ""
	spec.URL = u
	if spec.Name == "" {
		spec.Name = u.Host
	}
	return spec, nil
}

// ReadUpstreamsFile reads an --upstreams-file: one server a line, as
// "URL" or "NAME=URL", optionally followed by the word "drain"; blank lines
// and # comments are ignored. Every bad line is reported.
func ReadUpstreamsFile(path string) ([]UpstreamSpec, []string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, nil, unwrapPathError(err)
	}
	specs, problems := ParseUpstreams(b)
	return specs, problems, nil
}

// ParseUpstreams reads the text of an upstreams file.
func ParseUpstreams(b []byte) ([]UpstreamSpec, []string) {
	var (
		specs    []UpstreamSpec
		problems []string
	)
	sc := bufio.NewScanner(bytes.NewReader(b))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if i := strings.Index(line, "#"); i >= 0 && (i == 0 || line[i-1] == ' ' || line[i-1] == '\t') {
			line = strings.TrimSpace(line[:i])
		}
		if line == "" {
			continue
		}
		fields := strings.Fields(line)
		drain := false
		if len(fields) == 2 && fields[1] == "drain" {
			drain = true
		} else if len(fields) != 1 {
			problems = append(problems, fmt.Sprintf("line %d: want URL or NAME=URL, optionally followed by drain", n))
			continue
		}
		spec, err := ParseUpstream(fields[0])
		if err != nil {
			problems = append(problems, fmt.Sprintf("line %d: %v", n, err))
			continue
		}
		spec.Drain = drain
		specs = append(specs, spec)
	}
	problems = append(problems, duplicateNames(specs)...)
	return specs, problems
}

func duplicateNames(specs []UpstreamSpec) []string {
	var problems []string
	seen := map[string]bool{}
	for _, s := range specs {
		if seen[s.Name] {
			problems = append(problems, fmt.Sprintf("server name %q is used twice (name them: NAME=URL)", s.Name))
		}
		seen[s.Name] = true
	}
	return problems
}

// pointsAtSelf reports whether u is the gateway's own address: the same
// port, and a host that is one of the listen addresses (or this machine,
// when listening on every interface).
func pointsAtSelf(u *url.URL, listen []string, port int) bool {
	p := u.Port()
	if p == "" {
		p = map[string]string{"http": "80", "https": "443"}[u.Scheme]
	}
	if n, err := strconv.Atoi(p); err != nil || n != port {
		return false
	}
	host := u.Hostname()
	local := func(h string) bool {
		if strings.EqualFold(h, "localhost") {
			return true
		}
		ip := net.ParseIP(h)
		return ip != nil && ip.IsLoopback()
	}
	for _, l := range listen {
		lip := net.ParseIP(l)
		switch {
		case strings.EqualFold(l, host):
			return true
		case lip != nil && lip.IsUnspecified() && local(host):
			return true
		case local(l) && local(host):
			return true
		case lip != nil && net.ParseIP(host) != nil && lip.Equal(net.ParseIP(host)):
			return true
		}
	}
	return false
}
