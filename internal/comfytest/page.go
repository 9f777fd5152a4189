package comfytest

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net/http"
	"path"
	"strings"
	"time"
)

// startTime is the Last-Modified of the static files.
var startTime = time.Now().Truncate(time.Second)

// serveIndex is GET / (server.py get_root): a tiny page that does what the
// ComfyUI frontend does first, and reports each step in an element a
// browser test can read: #object-info, #ws, #img and #prompt hold
// "ok ..." or "error ...".
//
// The headers are those of v0.3.7 and 0.8.0, which send index.html as an
// aiohttp FileResponse (type from the extension, ETag, Last-Modified,
// Range) with Cache-Control no-cache, Pragma no-cache and Expires 0.
func (f *Fake) serveIndex(w http.ResponseWriter, r *http.Request, _ []string) {
	h := w.Header()
	h.Set("Cache-Control", "no-cache")
	h.Set("Pragma", "no-cache")
	h.Set("Expires", "0")
	h.Set("Content-Type", "text/html")
	h.Set("ETag", indexETag)
	http.ServeContent(w, r, "", startTime, strings.NewReader(indexHTML))
}

// indexETag is aiohttp's ETag for a file: modification time in
// nanoseconds and size, in hex.
var indexETag = fmt.Sprintf(`"%x-%x"`, startTime.UnixNano(), len(indexHTML))

func staticFile(name string, body []byte) func(*Fake, http.ResponseWriter, *http.Request, []string) {
	return func(_ *Fake, w http.ResponseWriter, r *http.Request, _ []string) {
		w.Header().Set("Content-Type", contentType(name))
		http.ServeContent(w, r, "", startTime, bytes.NewReader(body))
	}
}

// serveCoreExtension serves a stub for each script that /extensions lists.
func serveCoreExtension(f *Fake, w http.ResponseWriter, r *http.Request, args []string) {
	name := "/extensions/core/" + args[0]
	if !bytes.Contains(sampleExtensions, []byte(`"`+name+`"`)) && args[0] != "example.js" {
		aiohttpError(w, http.StatusNotFound)
		return
	}
	f.logf("comfytest: deprecated path %s", name)
	body := "// ComfyUI simulator: stand-in for " + name + "\nexport const simulated = " + `"` + path.Base(name) + `"` + ";\n"
	staticFile(name, []byte(body))(f, w, r, nil)
}

// faviconICO is an .ico file that wraps the sample PNG.
var faviconICO = func() []byte {
	var b []byte
	b = binary.LittleEndian.AppendUint16(b, 0) // reserved
	b = binary.LittleEndian.AppendUint16(b, 1) // icon
	b = binary.LittleEndian.AppendUint16(b, 1) // one image
	b = append(b, 64, 64, 0, 0)                // 64x64, no palette
	b = binary.LittleEndian.AppendUint16(b, 1)
	b = binary.LittleEndian.AppendUint16(b, 32)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(samplePNG)))
	b = binary.LittleEndian.AppendUint32(b, 22)
	return append(b, samplePNG...)
}()

const apiJS = `// ComfyUI simulator: stand-in for the legacy scripts/api.js.
export const api = {
  apiURL: (route) => location.pathname.replace(/\/[^/]*$/, "") + "/api" + route,
};
`

var indexHTML = strings.Replace(`<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>ComfyUI simulator</title>
<link rel="icon" href="favicon.ico">
<style>
body { font-family: sans-serif; margin: 2em; max-width: 50em; }
dt { font-weight: bold; margin-top: 0.6em; }
.banner { background: #fe8; padding: 0.6em; border: 1px solid #b90; }
</style>
</head>
<body>
<h1>ComfyUI simulator</h1>
<p class="banner">This is a <strong>simulator</strong> of ComfyUI for trying comfygate without a GPU.
It is not ComfyUI: it runs no models, and every image it makes is the same small PNG.</p>
<dl>
<dt>GET /api/object_info</dt><dd id="object-info">pending</dd>
<dt>WebSocket /ws</dt><dd id="ws">pending</dd>
<dt>GET /api/view</dt><dd id="img">pending</dd>
<dt>POST /api/prompt</dt><dd id="prompt">not sent</dd>
</dl>
<p><img id="probe" alt="sample output" width="64" height="64"></p>
<p><button id="queue" type="button">Queue the sample prompt</button></p>
<script>
SCRIPT</script>
</body>
</html>
`, "SCRIPT", indexJS, 1)

// indexJS is the page's script. It computes the API base like the
// frontend's api.ts (the page's directory), so the page also works behind a
// gateway that serves it under a path prefix.
var indexJS = `// ComfyUI simulator page script.
(function () {
  "use strict";
  var base = location.pathname.replace(/\/[^/]*$/, "").replace(/\/api$/, "");
  var samplePrompt = ` + string(samplePrompt) + `;
  var clientId = Array.from(crypto.getRandomValues(new Uint8Array(16)),
    function (b) { return b.toString(16).padStart(2, "0"); }).join("");
  var promptId = null;
  var finished = {}; // the run may end before the POST answer is read

  function report(id, ok, text) {
    document.getElementById(id).textContent = (ok ? "ok " : "error ") + text;
  }

  fetch(base + "/api/object_info").then(function (res) {
    if (!res.ok) { throw new Error("HTTP " + res.status); }
    return res.json();
  }).then(function (info) {
    report("object-info", true, Object.keys(info).length + " node classes");
  }).catch(function (err) {
    report("object-info", false, String(err));
  });

  var img = document.getElementById("probe");
  img.onload = function () { report("img", true, img.naturalWidth + "x" + img.naturalHeight); };
  img.onerror = function () { report("img", false, "could not load " + img.src); };
  img.src = base + "/api/view?filename=` + sampleOutputName + `&type=output&subfolder=";

  var opened = false;
  var scheme = location.protocol === "https:" ? "wss:" : "ws:";
  var ws = new WebSocket(scheme + "//" + location.host + base + "/ws?clientId=" + clientId);
  ws.onopen = function () { opened = true; };
  ws.onerror = function () { report("ws", false, "socket error"); };
  ws.onclose = function (ev) { report("ws", false, "closed, code " + ev.code); };
  ws.onmessage = function (ev) {
    if (typeof ev.data !== "string") { return; }
    var msg = JSON.parse(ev.data);
    if (msg.type === "status" && msg.data.sid) {
      report("ws", true, "connected, sid " + msg.data.sid);
    }
    if (msg.type === "executing" && msg.data.node === null) {
      finished[msg.data.prompt_id] = true;
      if (msg.data.prompt_id === promptId) { report("prompt", true, "finished " + promptId); }
    }
  };

  document.getElementById("queue").onclick = function () {
    var body = Object.assign({}, samplePrompt, { client_id: clientId });
    fetch(base + "/api/prompt", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body)
    }).then(function (res) {
      return res.json().then(function (data) {
        if (!res.ok) { throw new Error("HTTP " + res.status + " " + JSON.stringify(data.error)); }
        promptId = data.prompt_id;
        if (finished[promptId]) {
          report("prompt", true, "finished " + promptId);
        } else {
          report("prompt", true, "queued " + promptId + (opened ? "" : " (no socket)"));
        }
      });
    }).catch(function (err) {
      report("prompt", false, String(err));
    });
  };
})();
`
