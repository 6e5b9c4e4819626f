"""Upstream: everything that talks to QuickBlox. The gateway client (``gateway``, the one module that speaks
HTTP to it), sessions and their signatures (``auth``), the session every worker shares (``sessions``), and the
fleet's budget of calls (``ratelimit``, its decisions Lua scripts in Redis).
"""
