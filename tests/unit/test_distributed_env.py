"""Slurm -> torch.distributed variables (arkd.distributed_env), its use in arkd-train, the Slurm launcher presets."""

from __future__ import annotations

import os
import sys

import pytest
from omegaconf import OmegaConf

import arkd.cli.train as train_cli
from arkd.config_paths import config_dir
from arkd.distributed_env import distributed_env, expand_nodelist, export_distributed_env, master_port, tasks_per_node

LAUNCHER_DIR = config_dir() / "hydra" / "launcher"
EXPORTED = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

# Task 9 of a two-node job of 8 tasks per node, as srun describes it.
SLURM_TASK_9 = {
    "SLURM_JOB_ID": "4242137",
    "SLURM_PROCID": "9",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_NTASKS": "16",
    "SLURM_TASKS_PER_NODE": "8(x2)",
    "SLURM_JOB_NODELIST": "gpu[07-08]",
    "SLURM_NNODES": "2",
}


# --- node lists ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("node1", ["node1"]),
        ("node1,node2", ["node1", "node2"]),
        ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
        ("gpu[8-10]", ["gpu8", "gpu9", "gpu10"]),
        ("gpu[098-101]", ["gpu098", "gpu099", "gpu100", "gpu101"]),
        ("gpu[1-2],cpu07,hm[3]", ["gpu1", "gpu2", "cpu07", "hm3"]),
        ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
        ("a100-[5,3]-ib", ["a100-5-ib", "a100-3-ib"]),
        (" node-a.cluster.org ", ["node-a.cluster.org"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize(
    ("nodelist", "fragment"),
    [
        ("", "empty"),
        ("gpu[1-", "without ']'"),
        ("gpu1]", "without '['"),
        ("gpu[[1]]", "nested"),
        ("gpu[3-1]", "decreasing"),
        ("gpu[a-b]", "bad range"),
        ("gpu[]", "bad range"),
        ("gpu[1-]", "bad range"),
        ("node1,,node2", "empty entry"),
    ],
)
def test_malformed_nodelist_is_one_sentence(nodelist, fragment):
    with pytest.raises(ValueError, match="expected") as err:
        expand_nodelist(nodelist)
    assert fragment in str(err.value)


def test_tasks_per_node():
    assert tasks_per_node("8") == [8]
    assert tasks_per_node("4(x2),2") == [4, 4, 2]
    assert tasks_per_node("2,1(x3)") == [2, 1, 1, 1]
    with pytest.raises(ValueError, match="expected e.g."):
        tasks_per_node("4x2")


def test_master_port_is_deterministic_high_and_spread():
    assert master_port("4242137") == master_port("4242137") == 20000 + 4242137 % 10000
    ports = {master_port(str(job)) for job in range(4242137, 4242137 + 64)}  # a job array's consecutive ids
    assert len(ports) == 64 and all(20000 <= port < 30000 for port in ports)
    with pytest.raises(ValueError, match="no digits"):
        master_port("abc")


# --- the variables -----------------------------------------------------------------------------------------------


def test_slurm_task_gets_the_torch_distributed_variables():
    assert distributed_env(SLURM_TASK_9) == {
        "RANK": "9",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "16",
        "LOCAL_WORLD_SIZE": "8",
        "MASTER_ADDR": "gpu07",
        "MASTER_PORT": str(20000 + 4242137 % 10000),
    }


def test_uneven_tasks_per_node_and_step_variables_win():
    env = dict(SLURM_TASK_9, SLURM_TASKS_PER_NODE="8(x2)", SLURM_NODEID="1", SLURM_PROCID="5", SLURM_LOCALID="0")
    env |= {"SLURM_STEP_NUM_TASKS": "6", "SLURM_STEP_TASKS_PER_NODE": "5,1", "SLURM_STEP_NODELIST": "gpu[03,09]"}
    out = distributed_env(env)
    assert (out["WORLD_SIZE"], out["LOCAL_WORLD_SIZE"], out["MASTER_ADDR"]) == ("6", "1", "gpu03")


def test_existing_master_address_and_port_are_kept():
    out = distributed_env(dict(SLURM_TASK_9, MASTER_ADDR="gpu07-ib", MASTER_PORT="31337"))
    assert "MASTER_ADDR" not in out and "MASTER_PORT" not in out
    assert out["RANK"] == "9"


def test_single_node_without_nodelist_uses_loopback():
    env = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4"}
    out = distributed_env(env)
    assert (out["MASTER_ADDR"], out["LOCAL_WORLD_SIZE"], out["WORLD_SIZE"]) == ("127.0.0.1", "4", "4")


def test_several_nodes_without_nodelist_is_an_error():
    env = {key: value for key, value in SLURM_TASK_9.items() if key != "SLURM_JOB_NODELIST"}
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        distributed_env(env)


def test_malformed_slurm_number_is_one_sentence():
    with pytest.raises(ValueError, match="SLURM_PROCID='x' is not a non-negative integer"):
        distributed_env(dict(SLURM_TASK_9, SLURM_PROCID="x"))


def test_submitit_local_tasks():
    env = {"SUBMITIT_LOCAL_JOB_ID": "31415", "SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_LOCALID": "1"}
    env["SUBMITIT_LOCAL_NTASKS"] = "2"
    assert distributed_env(env) == {
        "RANK": "1",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(20000 + 31415 % 10000),
    }


@pytest.mark.parametrize(
    "environ",
    [
        pytest.param({"PATH": "/usr/bin", "HOME": "/root"}, id="outside-slurm"),
        pytest.param(dict(SLURM_TASK_9, SLURM_NTASKS="1", SLURM_TASKS_PER_NODE="1"), id="one-task"),
        pytest.param(dict(SLURM_TASK_9, SLURM_STEP_NUM_TASKS="1"), id="one-task-step"),
        pytest.param({k: v for k, v in SLURM_TASK_9.items() if k != "SLURM_PROCID"}, id="salloc-shell"),
        pytest.param(dict(SLURM_TASK_9, RANK="3"), id="accelerate-launch"),
        pytest.param(dict(SLURM_TASK_9, WORLD_SIZE="16"), id="world-size-set"),
        pytest.param(dict(SLURM_TASK_9, LOCAL_RANK="0"), id="local-rank-set"),
        pytest.param(
            {"SUBMITIT_LOCAL_JOB_ID": "1", "SUBMITIT_LOCAL_GLOBALID": "0", "SUBMITIT_LOCAL_NTASKS": "1"}, id="local-1"
        ),
    ],
)
def test_nothing_to_do(environ):
    assert distributed_env(environ) == {}


def _fake_environment(monkeypatch, values: dict[str, str]) -> None:
    """Clear every Slurm, submitit and torch.distributed variable of os.environ, then set ``values``; monkeypatch
    restores all of them (including the ones export_distributed_env sets) after the test."""
    keys = {k for k in os.environ if k.startswith(("SLURM_", "SUBMITIT_"))} | set(EXPORTED) | set(SLURM_TASK_9)
    for key in keys:
        monkeypatch.setenv(key, "placeholder")  # recorded first, so teardown restores the original state
        monkeypatch.delenv(key)
    for key, value in values.items():
        monkeypatch.setenv(key, value)


def test_export_sets_os_environ(monkeypatch):
    _fake_environment(monkeypatch, SLURM_TASK_9)
    exported = export_distributed_env()
    assert {key: os.environ[key] for key in EXPORTED} == exported
    assert os.environ["RANK"] == "9" and os.environ["MASTER_ADDR"] == "gpu07"
    assert export_distributed_env() == {}  # RANK is now set: a second call (next run of a sweep) changes nothing


def test_export_outside_slurm_leaves_os_environ_alone(monkeypatch):
    _fake_environment(monkeypatch, {})
    before = dict(os.environ)
    assert export_distributed_env() == {}
    assert dict(os.environ) == before


# --- arkd-train ------------------------------------------------------------------------------------------------


def test_arkd_train_job_exports_before_training(monkeypatch, tmp_path, capsys):
    _fake_environment(monkeypatch, SLURM_TASK_9)
    seen = {}

    def fake_run(cfg):
        seen.update({key: os.environ.get(key) for key in EXPORTED})
        return {"run_dir": str(tmp_path)}

    monkeypatch.setattr("arkd.recipes.distill.run", fake_run)  # _task imports the recipe at call time
    train_cli._task(OmegaConf.create({"output_dir": str(tmp_path)}))
    assert seen["RANK"] == "9" and seen["WORLD_SIZE"] == "16" and seen["MASTER_ADDR"] == "gpu07"
    assert "done" not in capsys.readouterr().out  # rank 9 does not print


def test_arkd_train_job_reports_a_bad_slurm_environment(monkeypatch, tmp_path, capsys):
    _fake_environment(monkeypatch, dict(SLURM_TASK_9, SLURM_JOB_NODELIST="gpu[1-"))
    monkeypatch.setattr("arkd.recipes.distill.run", lambda cfg: pytest.fail("trained despite a bad Slurm environment"))
    with pytest.raises(SystemExit) as err:
        train_cli._task(OmegaConf.create({"output_dir": str(tmp_path)}))
    assert err.value.code == 1
    assert capsys.readouterr().err.startswith("arkd-train: Slurm node list 'gpu[1-' has a '[' without ']'")


def test_submitit_launcher_without_the_plugin_is_one_sentence(monkeypatch):
    monkeypatch.setattr(train_cli, "_submitit_plugin_installed", lambda: False)
    message = train_cli.check_overrides(["-m", "hydra/launcher=slurm", "config=tiny", "seed=0,1"])
    assert message is not None and 'pip install ".[slurm]"' in message and message.count(".") >= 1
    assert train_cli.check_overrides(["-m", "config=tiny", "seed=0,1"]) is None
    monkeypatch.setattr(train_cli, "_submitit_plugin_installed", lambda: True)
    assert train_cli.check_overrides(["-m", "hydra/launcher=slurm", "config=tiny", "seed=0,1"]) is None


# --- launcher presets --------------------------------------------------------------------------------------------


def test_launcher_presets_parse_and_hold_the_job_shape():
    assert {p.name for p in LAUNCHER_DIR.glob("*.yaml")} >= {"slurm.yaml", "slurm_local.yaml"}
    slurm = OmegaConf.load(LAUNCHER_DIR / "slurm.yaml")
    assert list(slurm.defaults) == ["submitit_slurm", "_self_"]
    assert slurm.tasks_per_node == slurm.gpus_per_node == 8  # one task per GPU
    assert slurm.nodes == 1 and slurm.timeout_min > 0 and slurm.cpus_per_task > 0
    for key in ("partition", "mem_gb", "setup", "additional_parameters", "submitit_folder", "max_num_timeout"):
        assert key in slurm, key
    local = OmegaConf.load(LAUNCHER_DIR / "slurm_local.yaml")
    assert list(local.defaults) == ["submitit_local", "_self_"]
    assert local.tasks_per_node == local.gpus_per_node and local.tasks_per_node > 1
    assert (LAUNCHER_DIR / "slurm.yaml").read_text().startswith("# @package hydra.launcher\n")


@pytest.mark.parametrize(("preset", "target"), [("slurm", "SlurmLauncher"), ("slurm_local", "LocalLauncher")])
def test_launcher_presets_compose_through_hydra(preset, target):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            overrides = [f"hydra/launcher={preset}", "config=gpt2_120m", "hydra.launcher.tasks_per_node=4"]
            cfg = compose("train", overrides=overrides, return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"] == f"hydra_plugins.hydra_submitit_launcher.submitit_launcher.{target}"
    assert launcher["tasks_per_node"] == 4  # the command line overrides the preset
    assert launcher["name"] == "arkd-gpt2_120m"
    assert launcher["submitit_folder"].startswith("multirun/gpt2_120m/") and launcher["submitit_folder"].endswith(
        "/.submitit/%j"
    )
    # Every key of the preset is a field of the plugin's schema (a typo would be a new, ignored key).
    schema = SlurmQueueConf if preset == "slurm" else LocalQueueConf
    preset_keys = set(OmegaConf.load(LAUNCHER_DIR / f"{preset}.yaml")) - {"defaults"}
    assert preset_keys <= set(schema.__dataclass_fields__)
    if preset == "slurm":
        assert launcher["gpus_per_node"] == 8 and launcher["additional_parameters"] == {}


def test_arkd_train_cfg_hydra_shows_the_slurm_launcher(monkeypatch, capsys):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    monkeypatch.setattr(sys, "argv", ["arkd-train"])
    train_cli.main(["hydra/launcher=slurm", "hydra.launcher.partition=gpu-a100", "config=gpt2_120m", "--cfg", "hydra"])
    out = capsys.readouterr().out
    assert "SlurmLauncher" in out and "partition: gpu-a100" in out and "tasks_per_node: 8" in out


def test_slurm_preset_renders_one_task_per_gpu_in_the_sbatch_script(monkeypatch, tmp_path):
    """The plugin's own launch() maps the preset onto submitit's real SlurmExecutor; only the submission is stubbed
    (a fake ``srun`` on PATH for submitit's cluster check, and map_array renders the script instead of calling sbatch).
    """
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    import submitit
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ.get('PATH', '')}")
    real_executor, rendered = submitit.AutoExecutor, {}

    class RenderingExecutor:
        def __init__(self, cluster, **kwargs):
            self.executor = real_executor(cluster=cluster, **kwargs)

        def update_parameters(self, **kwargs):
            self.executor.update_parameters(**kwargs)

        def map_array(self, fn, *args):
            rendered["jobs"] = len(args[0])
            rendered["sbatch"] = self.executor._executor._make_submission_file_text("python -m task", "uid")
            return []

    monkeypatch.setattr(submitit, "AutoExecutor", RenderingExecutor)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            overrides = ["hydra/launcher=slurm", "config=gpt2_120m", "hydra.launcher.partition=gpu-a100"]
            cfg = compose(
                "train", overrides=[*overrides, f"hydra.sweep.dir={tmp_path / 'sweep'}"], return_hydra_config=True
            )
    finally:
        GlobalHydra.instance().clear()
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    params.pop("_target_")
    launcher = SlurmLauncher(**params)
    launcher.config = cfg
    launcher.launch([["seed=0"], ["seed=1"]], initial_job_idx=0)
    assert rendered["jobs"] == 2
    script = rendered["sbatch"]
    for line in ("--nodes=1", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=10", "--partition=gpu-a100"):
        assert f"#SBATCH {line}\n" in script, line
    assert "#SBATCH --job-name=arkd-gpt2_120m\n" in script
    assert "\nsrun " in script  # the tasks are started by srun, which sets SLURM_PROCID, SLURM_LOCALID, ...
