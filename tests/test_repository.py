"""The repository stands on its own: nothing in it reads or names the data folder that sits beside the developers'
checkouts (users never have it), and every data file the package ships is reachable by name."""
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# built from parts, so that this file does not name the folder itself
BESIDE = re.compile(r"\.\./" + "shared" + r"|(?<![\w.-])" + "shared" + r"/(data|NOTES|hooks)")


def _files() -> list[Path]:
    "The files git tracks plus the untracked ones it does not ignore (or, outside a checkout, every file)."
    try:
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                             check=True, timeout=60).stdout.decode()
        return [REPO / f for f in out.split("\0") if f and (REPO / f).is_file()]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", ".venv-oldest", "__pycache__", "site", "build", "dist", ".pytest_cache"}
        return [p for p in REPO.rglob("*") if p.is_file() and not skip & set(p.relative_to(REPO).parts)]


def test_nothing_names_the_developers_data_folder():
    hits = []
    for p in _files():
        if p.suffix in (".safetensors", ".npz", ".whl", ".gguf", ".png"): continue
        try: text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError): continue
        hits += [f"{p.relative_to(REPO)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}" for m in BESIDE.finditer(text)]
    assert not hits, "the repository must not depend on a folder beside the checkout:\n" + "\n".join(hits[:30])


def test_the_detector_sees_each_form():
    for s in ("../" + "shared" + "/data/x.json", "../../" + "shared", " " + "shared" + "/NOTES.md", "`" + "shared" + "/data`"):
        assert BESIDE.search(s), s
    for s in ("a shared prefix", "the shared records", "ngram_shared", "shared_memory/data"):
        assert not BESIDE.search(s), s
