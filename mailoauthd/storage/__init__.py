"""
Where grants are kept: the state files on disk (atomic, fsynced, 0600, optionally
sealed), or a fleet's etcd with its leader election and fenced writes.
Nothing is lost: every token response is here before it is used.
"""
