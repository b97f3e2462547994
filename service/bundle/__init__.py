"""The bundle file format: the manifest schema (`manifest`), the torch-free header checks (`header`), tensors and
their decoding (`codec`), whether a bundle fits a backbone (`compat`) and the published JSON Schema (`schema`).

Import from the modules themselves: `header` must stay importable without torch (`promptserve-train inspect`).
"""
