"""Retrieval over any model: the one Searcher interface and two-stage re-ranking."""
