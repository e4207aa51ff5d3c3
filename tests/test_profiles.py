"""Cluster profiles: validation with named errors, and their mapping onto submitit's parameters."""

import re
from pathlib import Path

import pytest
import yaml

import run_bench
from bench.pipeline.profiles import Profile, ProfileError, load_profile
from bench.pipeline.slurm import executor_parameters, make_executor
from tests.test_pipeline import config, write


@pytest.mark.parametrize("name", ["local", "example_gpu"])
def test_shipped_profiles_load(name):
    profile = load_profile(name)
    written = yaml.safe_load((Path(__file__).parents[1] / "slurm" / f"{name}.yaml").read_text())
    assert len(written) >= 8  # every value the file sets, as the file sets it
    assert {key: getattr(profile, key) for key in written} == written


def test_profile_maps_onto_submitit_parameters():
    profile = load_profile("example_gpu")
    finetune = executor_parameters(profile, finetune=True)
    evaluation = executor_parameters(profile, finetune=False)
    assert finetune["slurm_partition"] == "gpu" and finetune["slurm_account"] == "my-lab"
    assert finetune["slurm_constraint"] == "a100" and finetune["slurm_array_parallelism"] == 16
    assert finetune["tasks_per_node"] == 4 and evaluation["tasks_per_node"] == 1
    assert finetune["gpus_per_node"] == 4 and finetune["timeout_min"] == 720 and finetune["mem_gb"] == 240
    assert finetune["slurm_setup"][0].startswith("export PYTHONPATH=")
    # each setup line in the job script as the line itself, between the guard's trap and its removal (test below)
    assert [line.split("\n")[0].partition("; ")[2] for line in finetune["slurm_setup"][2:-1]] == [
        "{ module load cuda/12.4", "{ export OMP_NUM_THREADS=10"]
    assert " trap 'code=$?; " in finetune["slurm_setup"][1] and " then trap - EXIT; " in finetune["slurm_setup"][-1]


def test_a_failing_setup_line_stops_the_job_script_with_one_line_naming_it(tmp_path):
    """The setup lines as submitit writes them into the job script, run by bash: what a line sets stays for the
    lines after it; the first line that fails (its exit status, as a shell line's: its last command's), or that
    ends the script itself (``exit``, also in a script it sources), ends the script with that status and one line
    naming the profile's file, the line's index, the line and its status. Before, the script went on after a
    failing line (a failed ``module load`` surfaced later as some other error, or not at all), and an ``exit``
    ended it with nothing said."""
    import subprocess

    from bench.pipeline.slurm import guarded_setup

    def job(name: str, setup: list[str], profile: Path | None = Path("slurm/gpu.yaml"),
            before: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        script = tmp_path / f"{name}.sh"
        script.write_text("\n".join(["set -u", *before, *guarded_setup(setup, profile),
                                      "echo \"reached the run with $STEP\"", "exit 0"]))
        return subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=30)

    def said(index: int, line: str, status: int) -> str:
        return f"SetupError: slurm/gpu.yaml: setup[{index}]: {line!r} failed (exit {status}); the job stopped before its run\n"

    lines = ["export STEP=set", "echo \"50% $STEP\" # a comment", "false; test -n \"$STEP\"", "(exit 3)", "echo after"]
    done = job("failing", lines)
    assert (done.returncode, done.stdout, done.stderr) == (3, "50% set\n", said(3, "(exit 3)", 3)), done
    (tmp_path / "env.sh").write_text("echo sourced\nexit 4\n")  # e.g. an environment script that gives up
    done = job("exiting", [*lines[:3], f"source {tmp_path / 'env.sh'}", "echo after"])
    assert (done.returncode, done.stdout, done.stderr) == (4, "50% set\nsourced\n",
                                                           said(3, f"source {tmp_path / 'env.sh'}", 4)), done
    # a blank line and a comment too: an empty brace group would be a syntax error; the run's own exit says nothing
    done = job("fine", [*lines[:3], "", "  # a note"], None)
    assert (done.returncode, done.stdout, done.stderr) == (0, "50% set\nreached the run with set\n", ""), done
    assert guarded_setup(["", "# only a note"], None) == ["", "# only a note"]
    # an EXIT trap the script set before the setup lines is back after them; one a setup line sets stays
    done = job("prior", lines[:3], before=("trap 'echo \"prior trap, $?\"' EXIT",))
    assert (done.returncode, done.stdout, done.stderr) == (0, "50% set\nreached the run with set\nprior trap, 0\n", ""), done
    done = job("own", [*lines[:3], "trap 'echo \"own trap, $?\"' EXIT"], before=("trap 'echo prior' EXIT",))
    assert (done.returncode, done.stdout, done.stderr) == (0, "50% set\nreached the run with set\nown trap, 0\n", ""), done


def test_max_requeue_becomes_submitits_timeout_budget(tmp_path):
    executor = make_executor(tmp_path, Profile(partition="debug", max_requeue=7), finetune=False, name="t")
    assert executor._executor.max_num_timeout == 7
    assert make_executor(tmp_path, Profile(), finetune=False, name="t")._executor.max_num_timeout == 3


def test_profile_defaults_and_unset_keys():
    params = executor_parameters(Profile(partition="debug", gpus_per_node=0), finetune=True)
    assert params["slurm_partition"] == "debug" and params["tasks_per_node"] == 1
    assert "gpus_per_node" not in params and "mem_gb" not in params and "slurm_account" not in params
    assert params["slurm_setup"][1:] == []


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"partition": "debug", "gpus": 2}, "gpus: unknown key; allowed: partition, account, qos, gpus_per_node"),
        ({"mem_gb": "lots"}, "mem_gb: must be an integer >= 1, got 'lots'"),
        ({"mem_gb": 0}, "mem_gb: must be an integer >= 1, got 0"),  # was --mem=1GB for evaluation jobs
        ({"array_parallelism": 0}, "array_parallelism: must be an integer >= 1, got 0"),  # was --array=0-2%0
        ({"setup": "module load cuda"}, "setup: must be a list of shell lines"),
        ({"setup": ["ok", 3]}, "setup[1]: must be a string, got 3"),
        ({"max_requeue": -1}, "max_requeue: must be an integer >= 0, got -1"),
        ({"partition": 3}, "partition: must be a string, got 3"),
        # submitit's default limit is 5 minutes (user test 16): a profile says its own
        ({"partition": "debug"}, "timeout_min: required: the jobs' time limit in minutes (left out, submitit asks SLURM "
                                 "for 5); allowed: 2 or more"),
        ({"timeout_min": 1}, "timeout_min: must be an integer >= 2, got 1"),  # a job is signalled 90 s before its limit
        ({"timeout_min": 2.5}, "timeout_min: must be an integer >= 2, got 2.5"),  # user test 17: said ">= 0"
        ({"cpus_per_task": 0, "timeout_min": 10}, "cpus_per_task: must be an integer >= 1, got 0"),
    ],
)
def test_bad_profiles_are_one_line_errors(tmp_path, capsys, content, message):
    profile = tmp_path / "mine.yaml"
    profile.write_text(yaml.safe_dump(content))
    with pytest.raises(ProfileError, match=re.escape(message.split(":")[0])):
        load_profile(str(profile))
    path = write(tmp_path, config(tmp_path, grid={"methods": ["baseline"]}))
    code = run_bench.main(["--config", str(path), "--results", str(tmp_path / "r"), "--executor", "slurm",
                           "--profile", str(profile)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"error: {profile}: ") and message in err


def test_unknown_profile_lists_the_available_ones():
    with pytest.raises(ProfileError) as error:
        load_profile("nosuchcluster")
    assert "nosuchcluster.yaml: no such cluster profile; available: example_gpu, local" in str(error.value)
    assert Path(str(error.value).split(":")[0]).name == "nosuchcluster.yaml"
