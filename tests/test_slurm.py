"""SLURM without a cluster: the submitit launcher config resolves against the job's trainer
and renders the sbatch lines we expect; the sbatch example parses."""

import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from submitit.slurm.slurm import SlurmExecutor

from conftest import CONF, ROOT


class Submitted(Exception):
    """Raised instead of calling sbatch."""


def no_task(cfg: object) -> None:
    """The task function handed to the launcher (never run: nothing is submitted)."""


@pytest.mark.slow
def test_slurm_launcher_renders_sbatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "config",
            return_hydra_config=True,
            overrides=[
                "hydra/launcher=slurm",
                "trainer=ddp",
                "trainer.devices=4",
                "trainer.num_nodes=2",
                f"hydra.sweep.dir={tmp_path / 'sweep'}",
                f"paths.log_dir={tmp_path / 'logs'}",
            ],
        )
    launcher = instantiate(cfg.hydra.launcher)  # as Hydra does: ${trainer.*} resolved here
    assert (launcher.params["tasks_per_node"], launcher.params["nodes"]) == (4, 2)
    assert launcher.params["gpus_per_node"] == 4

    # Run the plugin's own launch() up to the sbatch call: no srun or sbatch needed.
    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 2))

    def submit(self: SlurmExecutor, path: Path) -> list[str]:
        raise Submitted(path)

    monkeypatch.setattr(SlurmExecutor, "_make_submission_command", submit)
    launcher.setup(hydra_context=None, task_function=no_task, config=cfg)
    with pytest.raises(Submitted) as submitted:
        launcher.launch([["data.fold=0"], ["data.fold=1"]], initial_job_idx=0)
    sbatch = Path(str(submitted.value)).read_text()
    lines = sbatch.splitlines()
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=64GB",
        "#SBATCH --time=1440",
        "#SBATCH --signal=USR2@120",
        "#SBATCH --requeue",
        "#SBATCH --array=0-1%2",  # the two jobs as one array
    ):
        assert line in lines, sbatch
    assert any(line.startswith("srun ") for line in lines)
    assert str(tmp_path / "sweep" / ".submitit") in sbatch


@pytest.mark.slow
def test_sbatch_example_parses() -> None:
    script = ROOT / "experiments" / "slurm" / "train.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    for line in (
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --signal=SIGUSR1@90",
        "#SBATCH --requeue",
    ):
        assert line in text.splitlines()
