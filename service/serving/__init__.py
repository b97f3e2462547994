"""Serving: bundles activated into task heads, versions kept in step with the registry, and the request path
(decode → micro-batch → image forward per need → head scores → probabilities)."""
