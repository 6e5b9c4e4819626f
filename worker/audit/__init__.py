"""Audit: what the audit log records and how its chain is hashed (``events``), the keys that encrypt PHI at rest
(``crypto``), the chain's signed anchors outside the database (``anchors``), and its verification from rows
(``verify``). No SQL: ``store.chain`` seals and reads the log.
"""
