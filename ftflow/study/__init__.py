"""The study's decisions and results: every run it makes, family selection, tables, intervals, the answer, the report, export, and a new study's config."""
