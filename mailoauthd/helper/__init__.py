"""
`mailoauth`, the helper: what a mail program's spawn touches, and the management commands.

Standard library only (tests/test_client.py walks every import here, lazy ones
included). Below it, and shared with the daemon, only the stdlib-only bottom:
mailoauthd.errors, mailoauthd.protocol, mailoauthd.fastpath, mailoauthd.paths,
mailoauthd.shared_files.
What needs the daemon's libraries runs as a child interpreter (`authorize --test`:
mailoauthd.authorization.trial; email-oauth2-proxy's Fernet: mailoauthd.migrate_fernet).

    token.py        the entry point, and `token`/`sasl`: the quick path, no argparse
    transport.py    which socket, one request line, one reply line
    sasl.py         XOAUTH2 and OAUTHBEARER initial responses
    commands.py     the argparse parser and dispatch of every other command
    status.py       `status`, `status --check`
    signin_terminal.py  `authorize`: the person's side of a sign-in
    logincheck.py   `test`      tokeninfo.py  `inspect`
    recipes.py      `recipe`    migrate.py    `import --from`

Every failure is a mailoauthd.errors class; token.main maps it to the exit status.
"""
