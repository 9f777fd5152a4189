package comfytest

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"path"
	"strconv"
	"strings"
	"sync"
	"time"
)

// fileKey names a file in one of ComfyUI's three directories.
type fileKey struct {
	typ, subfolder, name string
}

// file is a file served by /view. Content that is not an io.ReaderAt is
// shared by all requests, so mu serializes its use.
type file struct {
	mu      sync.Mutex
	content io.ReadSeeker
	size    int64
	modTime time.Time
}

// maxKeptUpload is the size up to which uploads are kept for /view.
const maxKeptUpload = 8 << 20

// AddFile makes /view serve content as filename in subfolder of the
// directory typ ("output", "input" or "temp"). The content is streamed with
// http.ServeContent (Range, ETag, Last-Modified, 304) and never copied, so
// it may be very large.
func (f *Fake) AddFile(typ, subfolder, filename string, content io.ReadSeeker, modTime time.Time) {
	size, err := content.Seek(0, io.SeekEnd)
	if err != nil {
		panic(fmt.Sprintf("comfytest: AddFile %s: %v", filename, err))
	}
	key := fileKey{typ, cleanSubfolder(subfolder), path.Base(filename)}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.files[key] = &file{content: content, size: size, modTime: modTime}
}

func cleanSubfolder(s string) string {
	s = path.Clean("/" + s)
	return strings.TrimPrefix(s, "/")
}

// serveView is GET /view (server.py view_image), without the preview and
// channel re-encodings: the raw file is always served, as aiohttp's
// FileResponse serves it (Range, ETag, Last-Modified, 304).
func (f *Fake) serveView(w http.ResponseWriter, r *http.Request, _ []string) {
	q := r.URL.Query()
	if !q.Has("filename") {
		writeEmpty(w, http.StatusNotFound)
		return
	}
	name := q.Get("filename")
	typ := ""
	for _, t := range []string{"output", "input", "temp"} {
		if n, ok := strings.CutSuffix(name, " ["+t+"]"); ok {
			name, typ = n, t
			break
		}
	}
	if name == "" || name[0] == '/' || strings.Contains(name, "..") {
		writeEmpty(w, http.StatusBadRequest)
		return
	}
	if typ == "" {
		typ = q.Get("type")
		if !q.Has("type") {
			typ = "output"
		}
	}
	if typ != "output" && typ != "input" && typ != "temp" {
		writeEmpty(w, http.StatusBadRequest)
		return
	}
	sub := q.Get("subfolder")
	if strings.HasPrefix(sub, "/") || escapes(sub) {
		writeEmpty(w, http.StatusForbidden)
		return
	}
	base := path.Base(name)
	f.mu.Lock()
	fl, ok := f.files[fileKey{typ, cleanSubfolder(sub), base}]
	f.mu.Unlock()
	if !ok {
		writeEmpty(w, http.StatusNotFound)
		return
	}

	// Both v0.3.7 and 0.8.0 answer these headers only: no nosniff, and a
	// type that would run in the browser becomes a download by its type
	// alone, without "attachment" (the newest code adds both).
	h := w.Header()
	ct := contentType(base)
	if ct == "text/html" || ct == "text/javascript" || ct == "text/css" {
		ct = "application/octet-stream"
	}
	h.Set("Content-Type", ct)
	h.Set("Content-Disposition", `filename="`+base+`"`)
	h.Set("ETag", fmt.Sprintf(`"%x-%x"`, fl.modTime.UnixNano(), fl.size))

	if ra, ok := fl.content.(io.ReaderAt); ok {
		http.ServeContent(w, r, "", fl.modTime, io.NewSectionReader(ra, 0, fl.size))
		return
	}
	fl.mu.Lock()
	defer fl.mu.Unlock()
	http.ServeContent(w, r, "", fl.modTime, fl.content)
}

// escapes reports whether a relative subfolder leaves its base directory.
func escapes(sub string) bool {
	c := path.Clean(sub)
	return c == ".." || strings.HasPrefix(c, "../")
}

// contentType guesses a type from the file name with a fixed table, so the
// answer does not depend on the machine's mime.types.
func contentType(name string) string {
	ext := strings.ToLower(path.Ext(name))
	switch ext {
	case ".png":
		return "image/png"
	case ".jpg", ".jpeg":
		return "image/jpeg"
	case ".webp":
		return "image/webp"
	case ".gif":
		return "image/gif"
	case ".svg":
		return "image/svg+xml"
	case ".json":
		return "application/json"
	case ".txt":
		return "text/plain"
	case ".html", ".htm":
		return "text/html"
	case ".js", ".mjs":
		return "text/javascript"
	case ".css":
		return "text/css"
	case ".mp4":
		return "video/mp4"
	case ".webm":
		return "video/webm"
	case ".wav":
		return "audio/x-wav"
	case ".flac":
		return "audio/flac"
	case ".ico":
		return "image/vnd.microsoft.icon"
	}
	return "application/octet-stream"
}

// serveUpload is POST /upload/image and /upload/mask. It streams the
// multipart body, hashing the image part, and keeps the file for /view only
// when it is small.
func (f *Fake) serveUpload(w http.ResponseWriter, r *http.Request, _ []string) {
	mr, err := r.MultipartReader()
	if err != nil {
		writeEmpty(w, http.StatusBadRequest)
		return
	}
	var (
		name, sub, overwrite string
		typ                  = "input"
		haveImage            bool
		sum                  string
		kept                 []byte // nil when the image was too big to keep
	)
	for {
		part, err := mr.NextPart()
		if err == io.EOF {
			break
		}
		if err != nil {
			writeEmpty(w, http.StatusBadRequest)
			return
		}
		switch part.FormName() {
		case "image":
			if haveImage {
				continue // aiohttp keeps the first file part
			}
			haveImage, name = true, part.FileName()
			h := sha256.New()
			var buf bytes.Buffer
			lw := &limitedBuffer{buf: &buf, max: maxKeptUpload}
			if _, err := io.Copy(io.MultiWriter(h, lw), part); err != nil {
				writeEmpty(w, http.StatusBadRequest)
				return
			}
			sum = hex.EncodeToString(h.Sum(nil))
			if !lw.over {
				kept = buf.Bytes()
			}
		case "type":
			typ = smallField(part)
		case "subfolder":
			sub = smallField(part)
		case "overwrite":
			overwrite = smallField(part)
		}
		part.Close()
	}
	if !haveImage || name == "" {
		writeEmpty(w, http.StatusBadRequest)
		return
	}
	if typ != "input" && typ != "temp" && typ != "output" {
		serverError(w)
		return
	}
	if strings.HasPrefix(sub, "/") || escapes(sub) || strings.Contains(name, "/") {
		writeEmpty(w, http.StatusBadRequest)
		return
	}
	name = path.Base(name)
	sub = cleanSubfolder(sub)

	f.mu.Lock()
	if overwrite != "true" && overwrite != "1" {
		// Same name: keep it if the content is identical, otherwise
		// pick "name (1).ext", "name (2).ext" and so on.
		ext := path.Ext(name)
		stem := strings.TrimSuffix(name, ext)
		for i := 1; ; i++ {
			old, exists := f.uploads[fileKey{typ, sub, name}]
			if !exists || old == sum {
				break
			}
			name = stem + " (" + strconv.Itoa(i) + ")" + ext
		}
	}
	key := fileKey{typ, sub, name}
	f.uploads[key] = sum
	if kept != nil {
		f.files[key] = &file{content: bytes.NewReader(kept), size: int64(len(kept)), modTime: time.Now()}
	} else {
		delete(f.files, key)
	}
	f.mu.Unlock()

	writeJSON(w, http.StatusOK, mustJSON(struct {
		Name      string `json:"name"`
		Subfolder string `json:"subfolder"`
		Type      string `json:"type"`
	}{name, sub, typ}))
}

func smallField(r io.Reader) string {
	b, _ := io.ReadAll(io.LimitReader(r, 4096))
	return string(b)
}

// limitedBuffer keeps writes until max bytes, then drops everything.
type limitedBuffer struct {
	buf  *bytes.Buffer
	max  int
	over bool
}

func (l *limitedBuffer) Write(p []byte) (int, error) {
	if !l.over {
		if l.buf.Len()+len(p) > l.max {
			l.over = true
			l.buf.Reset()
		} else {
			l.buf.Write(p)
		}
	}
	return len(p), nil
}
