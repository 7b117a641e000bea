"""Write docs/configuration.md from the typed config's field descriptions (tests/unit/study/test_init.py checks it)."""

from ftflow.study.init_config import CONFIGURATION_DOC, configuration_reference

CONFIGURATION_DOC.write_text(configuration_reference() + "\n", encoding="utf-8")
print(f"written: {CONFIGURATION_DOC}")
