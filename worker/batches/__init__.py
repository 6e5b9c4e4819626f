"""Batches: thousands of jobs from one JSON Lines file, every line validated first (``input``), stored in chunks
(``submission``), followed (``views``), ended once (``ending``) and exported (``export``).
"""
