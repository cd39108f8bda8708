"""Permission checks through the mount: the kernel's (default_permissions) or the daemon's own.

With ``-o nodefault_permissions`` the kernel leaves the checks to the filesystem, and SovOps applies the
POSIX rules itself to any caller but root.  These tests run an unprivileged child against such a mount
and check every refusal and every grant it must see.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from pathlib import Path

from tests.fuse.conftest import Mount

USER = 4242
OTHER = 4343


def _mount_options(mnt: Path) -> set[str]:
    for line in Path("/proc/mounts").read_text().splitlines():
        f = line.split()
        if f[1] == str(mnt):
            return set(f[3].split(","))
    raise AssertionError(f"{mnt} not in /proc/mounts")


def test_the_kernel_checks_by_default_and_root_keeps_its_rules_without_it(mount: Mount) -> None:
    assert "default_permissions" in _mount_options(mount.mnt)
    mount.unmount()
    mount.mount("nodefault_permissions")
    assert "default_permissions" not in _mount_options(mount.mnt)
    f = mount.mnt / "f"
    f.write_bytes(b"#!/bin/sh\n")
    os.chmod(f, 0o444)
    with open(f, "ab") as w:  # root writes a read-only file, as with the kernel's checks
        w.write(b"true\n")
    assert os.access(f, os.R_OK | os.W_OK)
    assert not os.access(f, os.X_OK)  # but executes nothing without an x bit
    try:
        os.execv(str(f), [str(f)]) if os.fork() == 0 else None
    except PermissionError:
        os._exit(77)
    _, status = os.wait()
    assert os.waitstatus_to_exitcode(status) == 77


def _as_user(mnt: Path, checks: Callable[[int], dict[str, int]]) -> dict[str, int]:
    """Run ``checks(dir_fd)`` in a child with uid/gid USER; return what it reported (name → errno, 0
    for success).  The mount's own directory is reached through a descriptor opened as root."""
    dfd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            os.setgroups([])
            os.setgid(USER)
            os.setuid(USER)
            out = checks(dfd)
        except BaseException as e:  # report, never return into pytest in the child
            out = {"child failed: " + repr(e): -1}
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    os.close(dfd)
    return json.loads(data)


def _try(results: dict[str, int], name: str, fn: Callable[[], object]) -> None:
    try:
        fn()
        results[name] = 0
    except OSError as e:
        results[name] = e.errno or -1


def test_the_daemon_applies_the_posix_rules_without_default_permissions(
    image: Path, mnt_factory: Callable[[Path], Mount]
) -> None:
    m = mnt_factory(image)
    m.mount("allow_other", "nodefault_permissions")
    try:
        assert "default_permissions" not in _mount_options(m.mnt)
        root = m.mnt
        os.chmod(root, 0o755)
        (root / "secret").write_bytes(b"s")
        os.chmod(root / "secret", 0o600)
        (root / "public").write_bytes(b"p")
        os.chmod(root / "public", 0o644)
        (root / "shared").mkdir(mode=0o777)
        os.chmod(root / "shared", 0o777)
        (root / "shared" / "roots").write_bytes(b"r")
        (root / "tmp").mkdir()
        os.chmod(root / "tmp", 0o1777)
        (root / "tmp" / "roots").write_bytes(b"r")
        (root / "closed").mkdir()
        os.chmod(root / "closed", 0o700)
        (root / "closed" / "inner").write_bytes(b"i")
        os.setxattr(root / "public", "user.tag", b"v")
        (root / "shared" / "suid").write_bytes(b"x")
        os.chown(root / "shared" / "suid", 0, USER)
        os.chmod(root / "shared" / "suid", 0o4775)  # group-writable set-user-ID: a member may write
        (root / "shared" / "theirs").write_bytes(b"t")
        os.chown(root / "shared" / "theirs", USER, OTHER)  # the user's file in a group it is not in
        (root / "listonly").mkdir()
        (root / "listonly" / "child").write_bytes(b"c")
        os.chmod(root / "listonly", 0o744)  # others may list it, not search it
        # Forget the cached names: the kernel does not ask the filesystem to look up a name it caches,
        # so a directory's search permission is checked only for the names it has to look up.
        Path("/proc/sys/vm/drop_caches").write_text("2\n")

        def checks(dfd: int) -> dict[str, int]:
            res: dict[str, int] = {}

            def at(p: str) -> str:
                return f"/proc/self/fd/{dfd}/{p}"

            _try(res, "read secret", lambda: os.close(os.open(at("secret"), os.O_RDONLY)))
            _try(res, "read public", lambda: os.close(os.open(at("public"), os.O_RDONLY)))
            _try(res, "write public", lambda: os.close(os.open(at("public"), os.O_WRONLY)))
            _try(res, "truncate public", lambda: os.truncate(at("public"), 0))
            _try(res, "create in root",
                 lambda: os.close(os.open(at("mine"), os.O_CREAT | os.O_WRONLY, 0o644)))
            _try(res, "mkdir in root", lambda: os.mkdir(at("mydir")))
            _try(res, "unlink in root", lambda: os.unlink(at("public")))
            _try(res, "create in shared",
                 lambda: os.close(os.open(at("shared/mine"), os.O_CREAT | os.O_WRONLY, 0o600)))
            res["owner of mine"] = os.stat(at("shared/mine")).st_uid
            _try(res, "chmod own", lambda: os.chmod(at("shared/mine"), 0o640))
            _try(res, "chown own to root", lambda: os.chown(at("shared/mine"), 0, -1))
            _try(res, "chgrp own to a foreign group", lambda: os.chown(at("shared/mine"), -1, OTHER))
            _try(res, "chmod roots", lambda: os.chmod(at("shared/roots"), 0o777))
            _try(res, "touch roots", lambda: os.utime(at("shared/roots")))
            _try(res, "unlink roots in shared", lambda: os.unlink(at("shared/roots")))
            _try(res, "create in tmp",
                 lambda: os.close(os.open(at("tmp/mine"), os.O_CREAT | os.O_WRONLY, 0o600)))
            _try(res, "unlink roots in tmp", lambda: os.unlink(at("tmp/roots")))
            _try(res, "rename roots out of tmp", lambda: os.rename(at("tmp/roots"), at("shared/taken")))
            _try(res, "rename own in tmp", lambda: os.rename(at("tmp/mine"), at("tmp/mine2")))
            _try(res, "unlink own in tmp", lambda: os.unlink(at("tmp/mine2")))
            _try(res, "lookup in closed", lambda: os.stat(at("closed/inner")))
            _try(res, "list closed", lambda: os.listdir(at("closed")))
            _try(res, "set user xattr on public", lambda: os.setxattr(at("public"), "user.x", b"1"))
            _try(res, "get user xattr of public", lambda: os.getxattr(at("public"), "user.tag"))

            def write_suid() -> None:
                fd = os.open(at("shared/suid"), os.O_WRONLY)
                os.write(fd, b"y")
                os.close(fd)

            _try(res, "write a group-writable setuid file", write_suid)
            res["its mode after the write"] = os.stat(at("shared/suid")).st_mode & 0o7777
            _try(res, "chmod g+s outside the group", lambda: os.chmod(at("shared/theirs"), 0o2755))
            res["mode after chmod g+s"] = os.stat(at("shared/theirs")).st_mode & 0o7777
            _try(res, "hard link to secret", lambda: os.link(at("secret"), at("shared/stolen")))
            _try(res, "hard link to own file", lambda: os.link(at("shared/mine"), at("shared/mine2")))
            _try(res, "list listonly", lambda: os.listdir(at("listonly")))
            _try(res, "stat in listonly after listing it", lambda: os.stat(at("listonly/child")))
            res["access R secret"] = int(os.access(at("secret"), os.R_OK))
            res["access R public"] = int(os.access(at("public"), os.R_OK))
            return res

        got = _as_user(root, checks)
    finally:
        m.unmount()
    acc, perm = errno.EACCES, errno.EPERM
    assert got == {
        "read secret": acc, "read public": 0, "write public": acc, "truncate public": acc,
        "create in root": acc, "mkdir in root": acc, "unlink in root": acc,
        "create in shared": 0, "owner of mine": USER, "chmod own": 0, "chown own to root": perm,
        "chgrp own to a foreign group": perm, "chmod roots": perm, "touch roots": acc,
        "unlink roots in shared": 0,
        "create in tmp": 0, "unlink roots in tmp": perm, "rename roots out of tmp": perm,
        "rename own in tmp": 0, "unlink own in tmp": 0,
        "lookup in closed": acc, "list closed": acc,
        "set user xattr on public": acc, "get user xattr of public": 0,
        "access R secret": 0, "access R public": 1,
        "write a group-writable setuid file": 0, "its mode after the write": 0o775,
        "chmod g+s outside the group": 0, "mode after chmod g+s": 0o755,
        "hard link to secret": perm, "hard link to own file": 0,
        "list listonly": 0, "stat in listonly after listing it": acc,
    }
