"""The task's text: splits and their fingerprints, the demo's generated reviews, augmentation (EDA, back-translation, masking) with WordNet and a translation service."""
