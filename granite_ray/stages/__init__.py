"""One runner per stage family, and the registry that names each stage's config, objective and runner."""
