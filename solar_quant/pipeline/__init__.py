"""Orchestration: stream a source checkpoint through a method into a variant folder."""
