// Command render renders a Helm chart's templates as `helm template` does, for the
// functions Braid's chart uses, so that CI can check the chart without a helm binary:
// Go's text/template, the sprig library, and Helm's include, tpl, required, toYaml,
// fromYaml, .Files.Get, .Files.Glob, .Release, .Chart and .Values.
//
//	go run ./helm/render --chart helm/braid -f values-gpu.yaml --name braid --namespace ml
//
// Build it in GOPATH mode against Debian's packages (no network):
// GO111MODULE=off GOPATH=/usr/share/gocode go build -o render ./helm/render
package main

import (
	"bytes"
	"flag"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"text/template"

	"github.com/Masterminds/sprig"
	"gopkg.in/yaml.v3"
)

type valueFiles []string

func (v *valueFiles) String() string     { return strings.Join(*v, ",") }
func (v *valueFiles) Set(s string) error { *v = append(*v, s); return nil }

// Files is the chart's .Files: paths are relative to the chart folder.
type Files struct{ root string }

func (f Files) Get(name string) (string, error) {
	b, err := os.ReadFile(filepath.Join(f.root, name))
	if err != nil {
		return "", fmt.Errorf(".Files.Get %q: %w", name, err)
	}
	return string(b), nil
}

// Glob returns the matching paths (as keys; Helm's values are the contents).
func (f Files) Glob(pattern string) (map[string]string, error) {
	matches, err := filepath.Glob(filepath.Join(f.root, pattern))
	if err != nil {
		return nil, err
	}
	out := map[string]string{}
	for _, m := range matches {
		rel, _ := filepath.Rel(f.root, m)
		b, err := os.ReadFile(m)
		if err != nil {
			return nil, err
		}
		out[filepath.ToSlash(rel)] = string(b)
	}
	return out, nil
}

func readYAML(file string) (map[string]interface{}, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	out := map[string]interface{}{}
	if err := yaml.Unmarshal(b, &out); err != nil {
		return nil, fmt.Errorf("%s: %w", file, err)
	}
	return out, nil
}

// merge overlays src on dst: maps merge key by key, anything else replaces (Helm's rule).
func merge(dst, src map[string]interface{}) map[string]interface{} {
	for k, v := range src {
		sub, isMap := v.(map[string]interface{})
		base, baseIsMap := dst[k].(map[string]interface{})
		if isMap && baseIsMap {
			dst[k] = merge(base, sub)
		} else {
			dst[k] = v
		}
	}
	return dst
}

func toYaml(v interface{}) string {
	var buf bytes.Buffer
	enc := yaml.NewEncoder(&buf)
	enc.SetIndent(2)
	if err := enc.Encode(v); err != nil {
		return ""
	}
	return strings.TrimSuffix(buf.String(), "\n")
}

func fromYaml(s string) map[string]interface{} {
	out := map[string]interface{}{}
	if err := yaml.Unmarshal([]byte(s), &out); err != nil {
		out["Error"] = err.Error()
	}
	return out
}

func required(msg string, v interface{}) (interface{}, error) {
	if v == nil || v == "" {
		return nil, fmt.Errorf("%s", msg)
	}
	return v, nil
}

func render(chartDir string, values map[string]interface{}, name, namespace string) (string, error) {
	meta, err := readYAML(filepath.Join(chartDir, "Chart.yaml"))
	if err != nil {
		return "", err
	}
	chart := map[string]interface{}{
		"Name": meta["name"], "Version": meta["version"], "AppVersion": meta["appVersion"],
		"Description": meta["description"], "Type": meta["type"], "APIVersion": meta["apiVersion"],
	}
	top := map[string]interface{}{
		"Values":  values,
		"Chart":   chart,
		"Files":   Files{chartDir},
		"Release": map[string]interface{}{"Name": name, "Namespace": namespace, "Service": "Helm", "IsInstall": true, "Revision": 1},
	}

	root := template.New("chart")
	funcs := sprig.TxtFuncMap()
	delete(funcs, "env") // as Helm: a chart must not read the renderer's environment
	delete(funcs, "expandenv")
	funcs["toYaml"] = toYaml
	funcs["fromYaml"] = fromYaml
	funcs["required"] = required
	funcs["include"] = func(name string, data interface{}) (string, error) {
		var buf bytes.Buffer
		err := root.ExecuteTemplate(&buf, name, data)
		return buf.String(), err
	}
	funcs["tpl"] = func(text string, data interface{}) (string, error) {
		t, err := root.Clone()
		if err != nil {
			return "", err
		}
		if t, err = t.New("tpl").Parse(text); err != nil {
			return "", err
		}
		var buf bytes.Buffer
		err = t.Execute(&buf, data)
		return buf.String(), err
	}
	root.Funcs(funcs).Option("missingkey=zero")

	paths, err := filepath.Glob(filepath.Join(chartDir, "templates", "*"))
	if err != nil {
		return "", err
	}
	sort.Strings(paths)
	var manifests []string
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			return "", err
		}
		if _, err := root.New(path.Join(filepath.Base(chartDir), "templates", filepath.Base(p))).Parse(string(b)); err != nil {
			return "", err
		}
		if !strings.HasPrefix(filepath.Base(p), "_") && strings.HasSuffix(p, ".yaml") {
			manifests = append(manifests, path.Join(filepath.Base(chartDir), "templates", filepath.Base(p)))
		}
	}
	var out strings.Builder
	for _, m := range manifests {
		var buf bytes.Buffer
		if err := root.ExecuteTemplate(&buf, m, top); err != nil {
			return "", err
		}
		text := strings.ReplaceAll(buf.String(), "<no value>", "")
		if strings.TrimSpace(text) == "" {
			continue
		}
		fmt.Fprintf(&out, "---\n# Source: %s\n%s\n", m, strings.Trim(text, "\n"))
	}
	return out.String(), nil
}

func main() {
	var files valueFiles
	chartDir := flag.String("chart", "helm/braid", "the chart folder")
	name := flag.String("name", "braid", "release name")
	namespace := flag.String("namespace", "default", "release namespace")
	flag.Var(&files, "f", "a values file over the chart's values.yaml (repeatable)")
	flag.Parse()

	values, err := readYAML(filepath.Join(*chartDir, "values.yaml"))
	if err == nil {
		for _, f := range files {
			var over map[string]interface{}
			if over, err = readYAML(f); err != nil {
				break
			}
			values = merge(values, over)
		}
	}
	var out string
	if err == nil {
		out, err = render(*chartDir, values, *name, *namespace)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "render:", err)
		os.Exit(1)
	}
	fmt.Print(out)
}
