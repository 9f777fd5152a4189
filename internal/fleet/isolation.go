package fleet

import (
	"context"
	"encoding/json"
	"io"
	"mime"
	"mime/multipart"
	"net/http"
	"os"
	"path"
	"strings"

	"github.com/comfygate/comfygate/internal/jsonerr"
	"github.com/comfygate/comfygate/internal/reqscope"
	"github.com/comfygate/comfygate/internal/route"
)

// Isolation (--isolation keys): every prompt belongs to the key that
// queued it, every output to its prompt's key, every upload to the key
// that sent it. A key sees and touches only its own; an admin-scope key
// sees everything; what the gateway cannot attribute (made before it
// started, or by a client that reached ComfyUI some other way) is
// admin-only. Refusals are 404, as if the thing did not exist, or 403
// where the client must be told (an upload name another key holds).

// viewer is who asks.
type viewer struct {
	owner string
	admin bool // sees everything: an admin key, or isolation off
}

// viewerOf returns who asks r.
func (f *Fleet) viewerOf(r *http.Request) viewer {
	return viewer{owner: owner(r), admin: !f.opts.Isolation || reqscope.From(r.Context()).KeyScope >= route.ScopeAdmin}
}

// sees reports whether v may see prompt p (nil: a prompt the gateway does
// not know).
func (v viewer) sees(p *Prompt) bool {
	return v.admin || (p != nil && v.owner != "" && p.Owner == v.owner)
}

// seesFile reports whether v may read file fl.
func (f *Fleet) seesFile(ctx context.Context, v viewer, fl File) bool {
	if v.admin {
		return true
	}
	o, ok, err := f.store.FileOwner(ctx, fl)
	return err == nil && ok && v.owner != "" && o == v.owner
}

// hidden answers a request for something v may not see, as if it did not
// exist.
func (f *Fleet) hidden(w http.ResponseWriter, r *http.Request) {
	reqscope.From(r.Context()).AuthFailure = "isolation"
	w.Header().Del("Connection")
	jsonerr.Write(w, http.StatusNotFound, "not_found", "no such prompt or file")
}

// indexOutputs records the files in a prompt's outputs (a history entry's
// "outputs" or an executed message's "output") as made by its owner.
func (f *Fleet) indexOutputs(ctx context.Context, server string, outputs any, owner string) {
	var walk func(v any)
	walk = func(v any) {
		switch t := v.(type) {
		case map[string]any:
			name, isFile := t["filename"].(string)
			typ, typed := t["type"].(string)
			if isFile && typed {
				sub, _ := t["subfolder"].(string)
				if s, unmarked, ok := unmarkSubfolder(sub); ok && s == server {
					sub = unmarked
				}
				f.store.PutFile(ctx, File{Server: server, Type: typ, Subfolder: sub, Filename: name}, owner)
				return
			}
			for _, x := range t {
				walk(x)
			}
		case []any:
			for _, x := range t {
				walk(x)
			}
		}
	}
	walk(outputs)
}

// uploadForm is what an upload says about the file it sends.
type uploadForm struct {
	name, subfolder, typ string
}

// readUploadForm reads the file name, subfolder and type of a multipart
// upload kept in tmp.
func readUploadForm(tmp *os.File, n int64, contentType string) (uploadForm, bool) {
	form := uploadForm{typ: "input"}
	_, params, err := mimeParams(contentType)
	if err != nil || params["boundary"] == "" {
		return form, false
	}
	mr := multipart.NewReader(io.NewSectionReader(tmp, 0, n), params["boundary"])
	for {
		part, err := mr.NextPart()
		if err != nil {
			break
		}
		switch part.FormName() {
		case "image":
			form.name = part.FileName()
		case "subfolder", "type":
			b, _ := io.ReadAll(io.LimitReader(part, 4096))
			if part.FormName() == "subfolder" {
				form.subfolder = string(b)
			} else if len(b) > 0 {
				form.typ = string(b)
			}
		}
		part.Close()
	}
	return form, form.name != ""
}

// inputFile is the upload a prompt's input value names, if it names one:
// "name.png", "sub/name.png", or either with " [input]".
func inputFile(value string) (File, bool) {
	v, annotated := strings.CutSuffix(value, " [input]")
	if !annotated && strings.HasSuffix(value, "]") {
		return File{}, false
	}
	dir, name := path.Split(v)
	return File{Type: "input", Subfolder: strings.TrimSuffix(dir, "/"), Filename: name}, name != ""
}

// othersFile reports whether graph loads a file that another key uploaded,
// or an output or temp file by name (which the gateway cannot attribute
// without its server): under isolation, a prompt may load only the
// uploads of its own key and files nobody uploaded through the gateway.
func (f *Fleet) othersFile(ctx context.Context, v viewer, graph map[string]graphNode) (string, bool) {
	if v.admin {
		return "", false
	}
	for _, n := range graph {
		for _, raw := range n.Inputs {
			var s string
			if json.Unmarshal(raw, &s) != nil {
				continue
			}
			if strings.HasSuffix(s, " [output]") || strings.HasSuffix(s, " [temp]") {
				return s, true
			}
			fl, ok := inputFile(s)
			if !ok {
				continue
			}
			if o, known, _ := f.store.FileOwner(ctx, fl); known && o != v.owner {
				return s, true
			}
		}
	}
	return "", false
}

// mimeParams parses a Content-Type.
func mimeParams(ct string) (string, map[string]string, error) { return mime.ParseMediaType(ct) }
