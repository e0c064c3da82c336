"""Images in, databases out: sources, files, caches and manifests, balanced databases, relevance."""
