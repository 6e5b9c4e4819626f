"""Store: every SQL statement of qbgw. The tables (``models``), engines and transactions (``db``), migrations
(``schema``), the audit chain's seal (``chain``), jobs (``jobs``, and ``hotpath`` on PostgreSQL), batches
(``batches``), reads (``reads``), key rotation and retention (``maintenance``), and database roles (``roles``).
Functions take the caller's session and never commit.
"""
