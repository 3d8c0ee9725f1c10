"""Run reports: a self-contained HTML page with plots."""
