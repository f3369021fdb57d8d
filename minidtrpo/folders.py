"""A run folder: its lock (one live run per folder), its metrics log and figure (curves.png), and
the checks that a folder being resumed holds the same run. Used by train.run_loop.
"""

import fcntl
import json
import os
import signal
import threading
from dataclasses import asdict, fields

from .config import BadInput, read_saved

CHECKPOINT = ("model", "model_config", "task", "task_options")  # what every checkpoint holds


def read_metrics(path) -> list[dict]:
    """The rows of a metrics.jsonl; a last line cut short by a kill is dropped, with a warning."""
    lines = open(path).read().splitlines() if os.path.exists(path) else []
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise BadInput(f"{path}: line {i + 1} is not JSON; the log is damaged") from None
            print(f"warning: {path}: dropped a damaged last line (a run was killed writing it)")
    return rows


def remove_stale_files(out_dir):
    """Temporary files a killed run left behind. Called under the folder's lock, so no live run
    is writing any of them."""
    for name in os.listdir(out_dir):
        if name.endswith(".tmp"):
            os.remove(os.path.join(out_dir, name))


class FolderLock:
    """One run per folder: the run holds an exclusive lock on out_dir/lock (fcntl.flock, released
    by the kernel when the process ends, killed or not); a second run there gets BadInput."""

    def __init__(self, folder):
        self.path = os.path.join(folder, "lock")

    def __enter__(self):
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            pid = self.file.read().strip()
            self.file.close()
            raise BadInput(f"{os.path.dirname(self.path)} is in use by a live run (pid {pid}); "
                           "wait for it or choose another --out_dir") from None
        self.file.truncate(0)
        self.file.write(str(os.getpid()))
        self.file.flush()
        return self

    def __exit__(self, *exc):
        self.file.close()  # releases the lock; the file stays, empty of meaning


# options that may differ when a run is resumed (how long and how often, where); any other
# difference means another run
RESUMABLE = {"resume", "time_budget", "max_iters", "max_steps", "epochs", "eval_every",
             "eval_every_s", "device", "out_dir"}


def resume_state(cfg, kind, models, task, device) -> dict:
    """The checkpoint of the run in cfg.out_dir, after checking that it is a run of this kind, task,
    model and options (RESUMABLE aside); BadInput names what differs. Nothing is changed before."""
    path = os.path.join(cfg.out_dir, "checkpoint.pt")
    state = read_saved(path, f"the checkpoint of a run ({kind}) to resume",
                       (*CHECKPOINT, "kind", "optimizer", "rng", "iter", "config"), device)
    if state["kind"] == kind:  # a run of another kind is named below as such
        same_options(state["config"], cfg, path)
    ours = {"kind": kind, "task": task.name, "task_options": dict(task.options),
            "model_config": asdict(models["model"].config),
            **{k: v for k, v in asdict(cfg).items() if k not in RESUMABLE}}
    saved = {**state, **state["config"]}
    differ = [f"{k}={saved.get(k)!r} there, {v!r} here" for k, v in ours.items()
              if saved.get(k) != v]
    if differ:
        raise BadInput(f"--resume: {cfg.out_dir} holds another run: " + "; ".join(differ))
    return state


def same_options(saved: dict, cfg, path: str):
    """A run saved with another set of options (by another version of minidtrpo) is refused with
    one line: its options cannot be read as today's."""
    names = {f.name for f in fields(cfg)}
    if set(saved) != names:
        other = sorted(set(saved) ^ names)
        raise BadInput(f"{path}: saved by another version of minidtrpo (options differ: "
                       f"{', '.join(other)}); delete it or choose another --out_dir")


def interrupt_on_sigterm():
    """SIGTERM (timeout, a scheduler, docker stop) ends a run like Ctrl-C: snapshot saved."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def plot_run(metrics_path, out_path, keys, kind="run"):
    """The health panel of a run (metrics.jsonl): test scores against training seconds, the final
    and the best test exact marked, then one plot per key against iterations; a key the run does
    not log gets a plot that says so (docs/math.md §5.5 defines each)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_metrics(metrics_path)
    test, train = [r for r in rows if "test_exact" in r], [r for r in rows if "test_exact" not in r]
    n = 1 + len(keys)
    cols = min(n, 4)
    n_rows = -(-n // cols)  # ⌈n / cols⌉
    fig, axes = plt.subplots(n_rows, cols, figsize=(3.6 * cols, 2.9 * n_rows), squeeze=False)
    a = axes.flat[0]
    seconds, exact = [r["train_seconds"] for r in test], [r["test_exact"] for r in test]
    a.plot(seconds, exact, "o-", ms=3, label="exact")
    a.plot(seconds, [r["test_reward"] for r in test], "s--", ms=3, label="reward")
    if test:
        best = max(range(len(exact)), key=exact.__getitem__)
        a.plot(seconds[best], exact[best], "*", color="gold", ms=13, mec="k",
               label=f"best exact {exact[best]:.3f}")
        a.annotate(f"final {exact[-1]:.3f}", (seconds[-1], exact[-1]), textcoords="offset points",
                   xytext=(-6, 8), ha="right", fontsize=8)
    a.set(xlabel="training seconds", ylabel="test score (greedy)", ylim=(0, 1), title="test set")
    a.legend(fontsize=7)
    for a, key in zip(axes.flat[1:], keys):
        pts = [(r["iter"], r[key]) for r in train if isinstance(r.get(key), (int, float))]
        if pts:
            a.plot(*zip(*pts), lw=0.8)
        else:
            a.text(0.5, 0.5, f"not logged by this {kind} run", ha="center", va="center",
                   transform=a.transAxes, fontsize=8, color="grey")
        a.set(xlabel="iteration", title=key)
    for a in axes.flat[n:]:
        a.axis("off")
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
