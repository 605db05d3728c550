"""Showing sparsity: per-layer reports, plots and the HTML / Markdown run report."""
