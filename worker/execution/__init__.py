"""Execution: the worker process. The thin Celery task (``tasks``) and the guard where it meets the job
(``faults``), the sweeper (``sweeper``), the process itself (``service``) and its heap trimmer (``heap``).
"""
