"""Per-stage graph export and the framework-free half of the exported-graph runtimes."""
