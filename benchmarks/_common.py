"""Helpers shared by the benchmarks: the machine, clocks, the matrix-multiply limit, peak memory, tables, JSON."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def pick_device(name: str = "auto") -> torch.device:
    "'auto': CUDA when present, else CPU."
    if name == "auto": return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return dev


def sync(device: torch.device | str | None = None):
    "Wait for queued accelerator work, so that a clock reads the work's end."
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"): torch.cuda.synchronize()


class Clock:
    """Wall-clock and process CPU seconds of a block (the accelerator synchronized at both ends).

    >>> with Clock() as c: sum(range(1000))
    >>> c.wall >= 0 and c.cpu >= 0
    True
    """
    def __init__(self, device=None): self.device = device

    def __enter__(self):
        sync(self.device)
        self._w, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.wall, self.cpu = time.perf_counter() - self._w, time.process_time() - self._c
        return False


def best_of(fn, repeat: int = 3, device=None, min_seconds: float = 0.0) -> tuple[float, object]:
    "The fastest wall time of `repeat` calls of fn() (more calls while the total stays under `min_seconds`); and fn's last result."
    times, out, total = [], None, 0.0
    while len(times) < repeat or total < min_seconds:
        with Clock(device) as c: out = fn()
        times.append(c.wall); total += c.wall
        if len(times) >= 50: break
    return min(times), out


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"): return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+uncommitted changes" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def machine(device: torch.device) -> dict:
    "What the numbers were measured on."
    import transformers
    info = dict(cpu=_cpu_model(), logical_cores=os.cpu_count(),
                usable_cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                torch_threads=torch.get_num_threads(), torch_interop_threads=torch.get_num_interop_threads(),
                device=str(device), device_name=(torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model()),
                python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
                platform=platform.platform(), git_commit=_git_commit(),
                omp_num_threads_env=os.environ.get("OMP_NUM_THREADS"))
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    return info


def load() -> list[float]:
    "1, 5 and 15-minute load averages (how busy the machine was)."
    try: return [round(x, 2) for x in os.getloadavg()]
    except OSError: return []


def matmul_rate(device: torch.device, dtype=torch.float32, n: int = 2048, repeat: int = 5) -> dict:
    "FLOP/s of a plain n×n×n matrix product (best of `repeat`): the machine's practical compute limit."
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    t, _ = best_of(lambda: a @ b, repeat=repeat, device=device, min_seconds=0.5)
    return dict(n=n, dtype=str(dtype).replace("torch.", ""), seconds=t, flops_per_s=2 * n**3 / t)


class PeakMemory:
    """Peak memory above the level at entry, in bytes: CUDA's allocator peak on a GPU; on the CPU the resident-set
    high-water mark (Linux: reset through /proc/self/clear_refs). On the CPU it is exact only when freed blocks go
    back to the system (run with MALLOC_MMAP_THRESHOLD_=65536, as `bench_solvers` does); `bytes` is None when the
    platform cannot tell."""
    def __init__(self, device: torch.device):
        self.device, self.bytes = torch.device(device), None

    @staticmethod
    def _status(key: str) -> int | None:
        try:
            for line in open("/proc/self/status"):
                if line.startswith(key + ":"): return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f: f.write("5")
                self._base = self._status("VmRSS")
            except OSError:
                self._base = None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self._base is not None:
            hwm = self._status("VmHWM")
            self.bytes = None if hwm is None else max(hwm - self._base, 0)
        return False


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def fmt(x, spec: str = ".3g") -> str:
    if x is None: return "-"
    if isinstance(x, str): return x
    return format(x, spec)


def table(rows: list[dict], cols: list[tuple[str, str, str]], title: str | None = None) -> str:
    "A plain-text table: `cols` = [(key, header, format spec)]."
    cells = [[h for _, h, _ in cols]] + [[fmt(r.get(k), f) for k, _, f in cols] for r in rows]
    widths = [max(len(row[j]) for row in cells) for j in range(len(cols))]
    line = lambda row: "  ".join(c.rjust(w) for c, w in zip(row, widths))
    out = ([title] if title else []) + [line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]]
    return "\n".join(out)


def write_json(path: Path, obj) -> Path:
    "The results as JSON, written atomically (unifiededit.store); values JSON lacks (devices, dtypes) as text."
    from unifiededit.store import write_text_atomic
    return write_text_atomic(path, json.dumps(obj, indent=1, default=str) + "\n")


def ratio(a, b):
    "a / b, or None when either is missing or b is 0."
    return None if a is None or b in (None, 0) else a / b
