"""`cohost k8s`: what Kubernetes reads from a plan, generated from the plan's env file.

The env file (`deploy/*.env`, written by `cohost plan`) stays the single source: `unit`
reads it into engines and the sharing mode, `gpu` turns that into what a platform's device
plugin can give (GPU share counts, node labels), and `render` writes the files a kustomize
overlay includes (deploy/k8s/overlays/*/generated/). docs/kubernetes.md explains the layout.
"""
