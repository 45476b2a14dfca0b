"""
Talking to an OAuth provider: token requests over HTTP, discovery, ID tokens, the
checks of what a provider sends (untrusted input) and of its configuration, and
`check-config --online`'s probe.
"""
