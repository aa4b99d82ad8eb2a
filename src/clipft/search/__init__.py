"""Search your own photos with a clipft or CLIP model: `index` (incremental SQLite + embedding shards),
`query` (exact top-k, near-duplicates, optional faiss index), `server` (local HTTP API and page)."""
