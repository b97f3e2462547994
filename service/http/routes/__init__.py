"""Route families: v1 (health, tasks, classify), versions (versions and aliases), KServe V2, web page, API docs."""
