"""Models: loading (hub ids, directories, 4-bit, trained runs), architecture facts from configs alone, the study's known models offline, the hub check, and the offline zoo."""
