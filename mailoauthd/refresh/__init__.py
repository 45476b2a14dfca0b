"""
Keeping tokens fresh: the scheduler, one refresh attempt, on-demand refreshes,
the grants' life cycle (import, authorize, revoke), accounts' state and the alerts
that tell a person. What the daemon does; the provider's HTTP is provider/'s.
"""
