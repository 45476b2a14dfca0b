"""mailoauthd: keeps OAuth2 tokens for mail accounts fresh and hands them to mail programs."""

__version__ = "0.1.0"
