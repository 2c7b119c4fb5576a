"""HTTP layer: OpenAI API, admin API, auth, metrics and the `loramux` CLI."""
