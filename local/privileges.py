"""Who nginx's workers run as when local mode is started by root.

nginx started as root runs its workers as the `user` of nginx.conf (`nobody` when unset). Local
mode never wants root workers: it picks an unprivileged account that exists and gives it a
private directory for nginx's temp files (large request bodies), since the workers cannot
write into the root-owned prefix. Not root: nginx runs as the caller and none of this applies.
"""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass
from pathlib import Path

from local import cleanup

WORKER_ACCOUNTS = ("www-data", "nginx", "nobody")
"""Accounts tried in order: Debian's and Red Hat's web-server users, then nobody."""


@dataclass(frozen=True)
class WorkerAccount:
    user: str
    group: str
    uid: int
    gid: int


def unprivileged_account(candidates: tuple[str, ...] = WORKER_ACCOUNTS) -> WorkerAccount | None:
    """The first candidate that exists and is not uid 0; None when there is none."""
    for name in candidates:
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            continue
        if pw.pw_uid == 0:
            continue
        try:
            group = grp.getgrgid(pw.pw_gid).gr_name
        except KeyError:
            continue
        return WorkerAccount(name, group, pw.pw_uid, pw.pw_gid)
    return None


def worker_account() -> WorkerAccount | None:
    """The account for nginx's workers: None unless this process is root."""
    return unprivileged_account() if os.geteuid() == 0 else None


def make_temp_dir(account: WorkerAccount) -> Path:
    """A fresh 0700 directory owned by ``account`` in the system temp dir (world-traversable,
    unlike a private workdir); nginx creates its temp paths inside it. Recorded in
    `local.cleanup`, so it goes even when the run is killed by a signal."""
    path = cleanup.temp_dir("llm_nginx_temp_")
    os.chown(path, account.uid, account.gid)
    return path


def remove_temp_dir(path: Path | None) -> None:
    cleanup.remove_temp_dir(path)
