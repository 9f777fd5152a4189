package comfytest

import (
	"net"
	"net/url"
	"strings"
)

// originRejected reports whether ComfyUI's origin-only middleware answers
// 403 to a request with this Host and Origin. It follows the Python code
// step by step (urlparse of the Origin, urlsplit of "//"+Host), including
// its quirks: the port is ignored when either side lacks one, and an Origin
// without a host part, such as "null", is never compared.
//
// Unlike ComfyUI, it does no DNS lookup: a Host is loopback when it is an IP
// literal in 127.0.0.0/8 or ::1, or the name "localhost".
func originRejected(host, origin string) bool {
	hostDomain := strings.ToLower(host)
	var hostName, hostPort string
	if u, err := url.Parse("//" + hostDomain); err == nil {
		hostName, hostPort = u.Hostname(), u.Port()
	}

	var originDomain, originName, originPort string
	if u, err := url.Parse(strings.ToLower(origin)); err == nil {
		originDomain, originName, originPort = u.Host, u.Hostname(), u.Port()
	}

	loopback := isLoopback(hostName)
	if originPort == "" {
		hostDomain = hostName
	}
	if hostPort == "" {
		originDomain = originName
	}
	return loopback && hostDomain != "" && originDomain != "" && hostDomain != originDomain
}

func isLoopback(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
