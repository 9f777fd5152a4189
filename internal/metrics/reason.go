package metrics

import (
	"context"
	"errors"
	"net"
	"net/http"
)

// upstreamReason classifies a failed exchange with ComfyUI.
func upstreamReason(r *http.Request, err error) string {
	var ne net.Error
	var tooLarge *http.MaxBytesError
	switch {
	case errors.As(err, &tooLarge):
		return "" // the client's body was too large: not ComfyUI's doing
	case errors.Is(err, context.Canceled) && r.Context().Err() != nil:
		return "canceled"
	case errors.Is(err, context.DeadlineExceeded), errors.As(err, &ne) && ne.Timeout():
		return "timeout"
	}
	return "unreachable"
}
