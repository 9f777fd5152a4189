package comfytest

import (
	"bytes"
	"embed"
	"encoding/json"
	"slices"
)

// The samples were captured from real ComfyUI servers; see testdata/README.md.
//
//go:embed testdata
var testdata embed.FS

func mustRead(name string) []byte {
	b, err := testdata.ReadFile("testdata/" + name)
	if err != nil {
		panic(err)
	}
	return b
}

func compactJSON(b []byte) []byte {
	var buf bytes.Buffer
	if err := json.Compact(&buf, b); err != nil {
		panic(err)
	}
	return buf.Bytes()
}

const sampleOutputName = "gw_probe_207800_00001_.png"

var (
	samplePNG        = mustRead("view_output.png")
	sampleStats      = mustRead("system_stats.json")
	sampleExtensions = compactJSON(mustRead("extensions.json"))
	sampleFeatures   = compactJSON(mustRead("newest_features.json"))
	samplePrompt     = compactJSON(mustRead("prompt_request.json"))

	samplePromptTxt2Img = compactJSON(mustRead("prompt_txt2img.json"))

	// classNames are the 243 node classes of v0.3.7, sorted.
	classNames = func() []string {
		var names []string
		if err := json.Unmarshal(mustRead("object_info_class_names.json"), &names); err != nil {
			panic(err)
		}
		slices.Sort(names)
		return names
	}()

	// detailedInfo holds the node definitions captured in full.
	detailedInfo = func() map[string]json.RawMessage {
		m := map[string]json.RawMessage{}
		for _, name := range []string{"object_info_EmptyImage.json", "object_info_SaveImage.json", "object_info_txt2img.json"} {
			var one map[string]json.RawMessage
			if err := json.Unmarshal(mustRead(name), &one); err != nil {
				panic(err)
			}
			for k, v := range one {
				m[k] = compactJSON(v)
			}
		}
		return m
	}()

	// slowGraph is the four-node workflow of queue_busy.json, used for the
	// items that SetQueue makes up.
	slowGraph = func() json.RawMessage {
		var q struct {
			Running [][]json.RawMessage `json:"queue_running"`
		}
		if err := json.Unmarshal(mustRead("queue_busy.json"), &q); err != nil {
			panic(err)
		}
		return compactJSON(q.Running[0][2])
	}()
)

// outputNodes are the classes the fake treats as output nodes.
var outputNodes = map[string]bool{"SaveImage": true, "PreviewImage": true}
