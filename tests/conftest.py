import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: intra-op threads only add hand-offs (and thrash on a loaded 2-core box). Module-wide, so a
    module's own fixtures (a reference run compared bit for bit with each test's) run on it too; restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _torch_threads_as_found():
    """Every test leaves torch's thread count as it found it: the exact-resume tests compare runs bit for bit, and
    a reduction split over another thread count rounds differently."""
    n = torch.get_num_threads()
    yield
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


_CACHES = ("__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis", ".benchmarks", ".venv", "build")
_CACHES += ("*.egg-info", "_skbuild")


def _untracked_files(root: str) -> set[str] | None:
    """Every file in the checkout git does not track (ignored ones included), caches and set-up products aside;
    None outside a git checkout."""
    import subprocess

    excludes = [arg for pattern in _CACHES for arg in ("-x", pattern)]
    try:
        out = subprocess.run(
            ["git", "-C", root, "ls-files", "--others", *excludes], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return set(out.stdout.splitlines()) if out.returncode == 0 else None


@pytest.fixture(scope="session", autouse=True)
def _checkout_stays_clean():
    """Tests and the tools they run write only under temporary directories: after the session the checkout holds
    no file it did not hold before (`make test` leaves nothing behind; issue 18)."""
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    before = _untracked_files(root)
    yield
    after = _untracked_files(root)
    if before is not None and after is not None:
        new = sorted(after - before)
        assert not new, f"the tests left {len(new)} file(s) in the checkout: {', '.join(new[:8])}"


@pytest.fixture(scope="session")
def qwen3_tokenizer():
    """The genuine Qwen3 tokenizer (tests/qwen3_real.py)."""
    from qwen3_real import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def qwen3_model_dir(tmp_path_factory) -> str:
    """A random-weight Qwen3 of the real vocabulary (151936, width 64, 2 layers) with the genuine tokenizer."""
    from qwen3_real import build_model_dir

    return build_model_dir(str(tmp_path_factory.mktemp("qwen3-real")))
