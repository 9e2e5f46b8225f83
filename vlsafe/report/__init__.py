"""Reports of study folders: results.json, report.md, a self-contained report.html, plots, README summaries."""
