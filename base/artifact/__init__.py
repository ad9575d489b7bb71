"""The artifact contract both sides read: exporter/ writes it, runtime/ reads it, neither imports the other.

- names: file names inside an artifact and the graph tensors' names (DESIGN.md §1)
- precision: compute dtypes, their torch/numpy forms, export tolerances and diff thresholds
- variants: what a graph is (role, batch, tokens per call, attention form, weight format, backends)
- manifest: the manifest's dataclasses and JSON form
- feeds: the one builder (and checker) of a graph call's inputs
- engines: the TensorRT engine checks that `build` and the TensorRT backend share
"""
