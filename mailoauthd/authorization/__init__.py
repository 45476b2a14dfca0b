"""
Signing in: the sans-I/O authorization request (PKCE, state, nonce), the sign-in
sessions (loopback listener and its pages, paste-back, device flow), and
`mailoauth authorize --test`'s trial run.
"""
