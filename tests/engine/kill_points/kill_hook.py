"""Kill points inside checkpoint saves, for tests/engine/test_checkpoint_faults.py.

`install(root, kill_at)` numbers, in this process, every step of a save that touches the
checkpoint, once the save has begun (a `torch.save` under `root` arms it; the first `skip_saves`
saves go by): a file saved (three steps: before it, half of it written, after it), a file opened
(written; or read back to be fsynced and hashed, a manifest read to prune), a rename, a removal,
a folder made or removed, every block of an HTTP request sent to the S3 server (uploads, the
manifest, deletions). At step `kill_at`, or at the `kill_occurrence`th step labelled
`kill_label` (as the log labels them: an upload's requests come from several threads, so their
number can vary), the process gets SIGKILL: alone, or with `whole_job` the node launcher (its
parent) and every other rank first. "Half of it written" cuts the file to
half its size before the kill, as a kill inside the write leaves it. With `log_path` every step
is appended there (the test's measuring save). No production code knows about it:
`sitecustomize.py` installs it in a `soho-scale train` rank from SOHO_KILL_* variables, the
in-process sweep calls it in a fork.
"""

from __future__ import annotations

import os
import signal
import sys


def install(
    root: str,
    kill_at: int,
    log_path: str | None = None,
    whole_job: bool = False,
    skip_saves: int = 0,
    kill_label: str | None = None,
    kill_occurrence: int = 1,
) -> None:
    local_root = os.path.realpath(root) + os.sep  # the checkpoint folder, or an S3 save's staging
    pid = os.getpid()
    state = {"armed": False, "count": 0}
    seen: dict[str, int] = {}  # label -> how many times it came
    folders: list[str] = []  # where torch.save wrote: one folder per save

    def under_root(path: object) -> bool:
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        return isinstance(path, str) and os.path.realpath(path).startswith(local_root)

    def die() -> None:
        if whole_job:
            import psutil

            launcher = psutil.Process(os.getppid())
            others = [p for p in launcher.children(recursive=True) if p.pid != pid]
            for process in [launcher, *others]:  # the launcher first: it restarts nothing
                try:
                    process.kill()
                except psutil.NoSuchProcess:
                    pass
        os.kill(pid, signal.SIGKILL)

    def kills(label: str) -> bool:
        """Whether the next step, `label`, is the one to kill at."""
        if kill_label is not None:
            return label == kill_label and seen.get(label, 0) + 1 == kill_occurrence
        return state["count"] + 1 == kill_at

    def point(label: str) -> None:
        fatal = kills(label)
        state["count"] += 1
        seen[label] = seen.get(label, 0) + 1
        if log_path:
            with open(log_path, "a") as f:
                f.write(f"{state['count']} {label}\n")
        if fatal:
            die()

    def hook(event: str, args: tuple) -> None:
        if os.getpid() != pid or not state["armed"]:
            return
        if event == "open" and under_root(args[0]):
            mode, flags = args[1], args[2]
            writes = (mode and any(c in mode for c in "wax+")) or (
                mode is None and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            )  # reads count too: the files read back and fsynced, the manifests read to prune
            point(f"open-{'write' if writes else 'read'} {args[0]}")
        elif event in ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree"):
            if under_root(args[0]):
                point(f"{event} {args[0]}")
        elif event == "http.client.send":
            data = (
                bytes(args[1][:80]) if isinstance(args[1], bytes | bytearray | memoryview) else b""
            )
            method, _, rest = data.split(b"\r\n")[0].decode(errors="replace").partition(" ")
            if method in ("GET", "PUT", "POST", "DELETE", "HEAD"):
                # the path, and a part's number (an upload's id differs from run to run)
                path, _, query = rest.split(" ")[0].partition("?")
                part = [q for q in query.split("&") if q.startswith("partNumber=")]
                point(" ".join(["send", method, path, *part]))
            else:
                point("send body block")

    sys.addaudithook(hook)

    def wrap(module) -> None:  # noqa: ANN001
        save = module.save

        def wrapped(obj, f, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
            if os.getpid() != pid or not under_root(f):
                return save(obj, f, *args, **kwargs)
            folder = os.path.dirname(os.path.realpath(f))
            if folder not in folders:
                folders.append(folder)
            state["armed"] = len(folders) > skip_saves  # the first `skip_saves` saves go by
            if not state["armed"]:
                return save(obj, f, *args, **kwargs)
            point(f"save-before {f}")
            if kills(f"save-half {f}"):
                save(obj, f, *args, **kwargs)
                os.truncate(f, os.path.getsize(f) // 2)
            point(f"save-half {f}")
            result = save(obj, f, *args, **kwargs)
            point(f"save-after {f}")
            return result

        module.save = wrapped

    if "torch.serialization" in sys.modules:  # a fork of a process that has torch
        import torch

        wrap(torch.serialization)
        torch.save = torch.serialization.save
        return
    # torch.save writes through C++ (no audit event): wrap it as torch.serialization is imported
    import importlib.abc
    import importlib.machinery

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):  # noqa: ANN001
            if name != "torch.serialization":
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            original = spec.loader.exec_module

            def exec_module(module) -> None:  # noqa: ANN001
                original(module)
                wrap(module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, Finder())


def install_from_env() -> None:
    """In the rank SOHO_KILL_RANK of a `soho-scale train` (not its launcher or loader workers)."""
    root = os.environ.get("SOHO_KILL_ROOT")
    if not root or "soho_scale.launch.rank" not in sys.orig_argv:
        return
    if os.environ.get("RANK") != os.environ.get("SOHO_KILL_RANK", "0"):
        return
    install(
        root,
        int(os.environ.get("SOHO_KILL_AT", "0")),
        os.environ.get("SOHO_KILL_LOG"),
        os.environ.get("SOHO_KILL_JOB") == "1",
        int(os.environ.get("SOHO_KILL_SKIP_SAVES", "0")),
    )
