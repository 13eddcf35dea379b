"""The shared run machinery of timed jobs (the sync, the map import): lease, watermark, budget, Runs."""
