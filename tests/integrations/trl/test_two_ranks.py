"""Two CPU processes (torchrun, gloo) accumulate the same gradient as one process on the same global batch, with
each group split across the ranks: the KL term needs nothing from other rows (k1-rtg-loss) or gathers the whole
generation batch first (k1-in-reward), and C counts sequences over all processes."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from kl_patches.audit.tolerances import LIBRARY_GRADIENT

pytestmark = pytest.mark.slow

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "two_ranks.py")
#: float64 end to end; the two runs differ only in summation order (DDP's all-reduce vs one batch).
TOLERANCE = LIBRARY_GRADIENT


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    from kl_patches.integrations.trl.audit import build_model, build_tokenizer

    folder = tmp_path_factory.mktemp("two-ranks")
    build_model(3, horizon=3, seed=0).save_pretrained(folder / "model")
    build_tokenizer(3).save_pretrained(folder / "model")
    return str(folder)


def launch(mode, processes, out, model_folder):
    env = {**os.environ, "KL_TWO_RANKS_MODEL": model_folder, "OMP_NUM_THREADS": "1"}
    env.pop("KL_PATCHES_MODE", None)
    root = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    if processes == 1:
        command = [sys.executable, SCRIPT, mode, out]
    else:
        torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
        command = [torchrun, "--nproc_per_node", str(processes), "--master_port", str(29500 + os.getpid() % 1000),
                   SCRIPT, mode, out]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=HERE)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return torch.load(out)


@pytest.mark.parametrize("mode", ["k1-rtg-loss", "k1-in-reward"])
def test_two_ranks_accumulate_the_one_rank_gradient(tmp_path, model_folder, mode):
    one = launch(mode, 1, str(tmp_path / "one.pt"), model_folder)
    two = launch(mode, 2, str(tmp_path / "two.pt"), model_folder)
    assert (one["world"], two["world"]) == (1, 2)
    assert one["grad"].abs().sum() > 0
    torch.testing.assert_close(two["grad"], one["grad"], **TOLERANCE)
