"""Distillation: the losses (apart, as plain maths), the teacher's stored targets, the teacher pass, the Trainer glue, and whether two models share a vocabulary."""
