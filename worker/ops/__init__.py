"""Operations: Prometheus metrics (``metrics``, counted where the work is; ``exporter``, the database's view),
health checks (``health``) and logs that never carry a secret or PHI (``logs``).
"""
