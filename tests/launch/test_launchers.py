"""The pod / cluster launchers (launch/tpu_pod.sh, launch/slurm.sbatch, launch/xpk.sh, launch/gke/).

Each launcher runs in a subprocess with ``--dry_run`` and its printed commands are checked
against the expected lines. A ``gcloud``, ``srun``, ``sbatch``, ``xpk``, ``docker`` and
``kubectl`` that fail loudly (and leave a mark) come first on PATH, so a dry run that called
anything would fail the test. The tests that run tpu_pod.sh without ``--dry_run`` (describe ->
create or reuse) use a fake ``gcloud`` that only records its arguments.
"""
import ast
import os
import re
import shlex
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TPU_POD = os.path.join(REPO, "launch", "tpu_pod.sh")
SLURM = os.path.join(REPO, "launch", "slurm.sbatch")
XPK = os.path.join(REPO, "launch", "xpk.sh")
JOBSET = os.path.join(REPO, "launch", "gke", "jobset.yaml")
DOCKERFILE = os.path.join(REPO, "launch", "gke", "Dockerfile")
FAKES = ("gcloud", "srun", "sbatch", "xpk", "docker", "kubectl")


@pytest.fixture
def env(tmp_path):
    """A clean environment whose PATH starts with tools that must not be called."""
    fake = tmp_path / "fakebin"
    fake.mkdir()
    for name in FAKES:
        tool = fake / name
        tool.write_text(f"#!/bin/sh\necho 'FAKE {name} CALLED in a dry run' >&2\n"
                        f"touch '{tmp_path}/called-{name}'\nexit 97\n")
        tool.chmod(0o755)
    e = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "FMJAX_"))}
    e.update(PATH=f"{fake}:{os.environ.get('PATH', '/usr/bin:/bin')}", TMPDIR=str(tmp_path))
    yield e
    assert not [p.name for p in tmp_path.glob("called-*")], "a dry run called an external tool"


def _run(cmd, env, expect_rc=0):
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == expect_rc, (proc.returncode, proc.stdout, proc.stderr)
    return proc


def _commands(stdout):
    """The printed command lines, without the "+ " prefix (comment lines start with "#")."""
    lines = stdout.splitlines()
    assert all(line.startswith(("+ ", "# ")) for line in lines), stdout
    return [line[2:] for line in lines if line.startswith("+ ")]


def _usage_error(cmd, env, *must_name):
    proc = _run(cmd, env, expect_rc=2)
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    for word in must_name:
        assert word in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------- launch/tpu_pod.sh

POD = ["--name=fm-pod", "--zone=us-central2-b"]
TRAIN = POD + ["--accelerator_type=v4-32", "--config=configs/mae.py:vit_b16_imagenet",
               "--workdir=gs://bucket/fmjax/mae"]
SSH = "gcloud compute tpus tpu-vm ssh fm-pod --zone=us-central2-b"
INSTALL_TAIL = ("(python3 -m pip install --user -q uv || python3 -m pip install --user -q --break-system-packages uv); "
                "python3 -m uv venv -q --seed --allow-existing --python 3.11 ~/fmjax-venv; "
                "cd ~/fmjax && ~/fmjax-venv/bin/pip install -q -e \".[tpu]\"")
RUN_CHECK = ("cd ~/fmjax && if [ -f ~/fmjax-train.pid ] && kill -0 \"$(cat ~/fmjax-train.pid)\" 2>/dev/null; then "
             "echo \"tpu_pod.sh: error: a run is still going on $(hostname); stop it with launch/tpu_pod.sh "
             "--name=fm-pod --zone=us-central2-b --stop\" >&2; exit 1; fi; ")
STREAM = (SSH + " --worker=0 --command='tail -n +1 -F --pid=\"$(cat ~/fmjax-train.pid)\" ~/fmjax-train.log'")


def _remote(line):
    """The --command of a printed gcloud ssh line, as the remote shell receives it."""
    (command,) = [a for a in shlex.split(line) if a.startswith("--command=")]
    return command[len("--command="):]


def _train_argv(line):
    """The argv that the remote shell gives launch/train.py in a printed train line."""
    remote = _remote(line)
    words = shlex.split(remote.split("launch/train.py ", 1)[1].split(" > ~/fmjax-train.log")[0])
    return words


def test_tpu_pod_dry_run_prints_create_install_train_stream(env, tmp_path):
    passthrough = ["--config.total_steps=1000", "--config.data.pp_train=resize(32)|flip_lr 'x' \"y\" $HOME",
                   "two words"]
    proc = _run([TPU_POD, "--dry_run", *TRAIN, "--env=TFDS_DATA_DIR=gs://bucket/tfds", "--", *passthrough], env)
    tgz = f"{tmp_path}/fmjax-fm-pod.tgz"
    cmds = _commands(proc.stdout)
    assert cmds[:5] == [
        "gcloud compute tpus tpu-vm describe fm-pod --zone=us-central2-b --format='value(state,acceleratorType)'",
        "gcloud compute tpus tpu-vm create fm-pod --zone=us-central2-b --accelerator-type=v4-32 "
        "--version=tpu-ubuntu2204-base",
        f"tar -czf {tgz} -C {REPO} --exclude=./.git --exclude=./.venv --exclude=./.ci-venv --exclude=./workdirs "
        "--exclude=./runs --exclude=./tmp --exclude=__pycache__ --exclude='*.pyc' --exclude='*.egg-info' "
        "--exclude=.pytest_cache --exclude=.jax_cache .",
        f"gcloud compute tpus tpu-vm scp {tgz} fm-pod:fmjax.tgz --zone=us-central2-b --worker=all",
        f"rm -f {tgz}",
    ]
    install, train, stream = cmds[5:]
    assert install.startswith(SSH + " --worker=all --command=")
    assert _remote(install) == ("set -e; rm -rf ~/fmjax && mkdir -p ~/fmjax && tar -xzf ~/fmjax.tgz -C ~/fmjax "
                                "&& rm -f ~/fmjax.tgz; " + INSTALL_TAIL)
    assert train.startswith(SSH + " --worker=all --command=")
    assert _remote(train) == (
        RUN_CHECK + "TFDS_DATA_DIR=gs://bucket/tfds nohup ~/fmjax-venv/bin/python launch/train.py "
        "--config=configs/mae.py:vit_b16_imagenet --workdir=gs://bucket/fmjax/mae --config.total_steps=1000 "
        "--config.data.pp_train='resize(32)|flip_lr '\\''x'\\'' \"y\" $HOME' 'two words' "
        "> ~/fmjax-train.log 2>&1 < /dev/null & echo $! > ~/fmjax-train.pid")
    # Every worker's train.py gets exactly the flags given after --.
    assert _train_argv(train) == ["--config=configs/mae.py:vit_b16_imagenet", "--workdir=gs://bucket/fmjax/mae",
                                  *passthrough]
    assert stream == STREAM


def test_tpu_pod_queued_spot_project_git(env):
    proc = _run([TPU_POD, "--dry_run", *TRAIN, "--queued", "--spot", "--project=my-proj",
                 "--git_url=https://github.com/me/fmjax.git", "--git_ref=v1", "--no_stream"], env)
    zone = "--zone=us-central2-b --project=my-proj"
    describe = f"gcloud compute tpus queued-resources describe fm-pod {zone} --format='value(state.state)'"
    cmds = _commands(proc.stdout)
    assert cmds[:3] == [
        describe,
        f"gcloud compute tpus queued-resources create fm-pod --node-id=fm-pod {zone} --accelerator-type=v4-32 "
        "--runtime-version=tpu-ubuntu2204-base --spot",
        describe,  # polled until ACTIVE
    ]
    assert "# every 30 s until the state is ACTIVE:" in proc.stdout
    install, train = cmds[3:]  # no tar / scp: the workers clone; no stream: --no_stream
    assert install.startswith(f"gcloud compute tpus tpu-vm ssh fm-pod {zone} --worker=all --command=")
    assert _remote(install) == ("set -e; rm -rf ~/fmjax && git clone -q https://github.com/me/fmjax.git ~/fmjax "
                                "&& git -C ~/fmjax checkout -q v1; " + INSTALL_TAIL)
    assert "nohup ~/fmjax-venv/bin/python launch/train.py" in _remote(train)


def test_tpu_pod_preemptible_reserved_runtime_and_defaults(env):
    proc = _run([TPU_POD, "--dry_run", *POD, "--accelerator_type=v5litepod-16", "--preemptible", "--reserved",
                 "--config=configs/clip.py", "--workdir=/mnt/shared/clip", "--skip_install", "--python=3.12"], env)
    cmds = _commands(proc.stdout)
    assert cmds[1] == ("gcloud compute tpus tpu-vm create fm-pod --zone=us-central2-b --accelerator-type=v5litepod-16 "
                       "--version=v2-alpha-tpuv5-lite --preemptible --reserved")
    assert len(cmds) == 4 and "launch/train.py --config=configs/clip.py --workdir=/mnt/shared/clip >" in cmds[2]
    for accel, runtime in [("v5p-32", "v2-alpha-tpuv5"), ("v6e-16", "v2-alpha-tpuv6e")]:
        out = _run([TPU_POD, "--dry_run", *POD, f"--accelerator_type={accel}", "--config=configs/mae.py",
                    "--workdir=/mnt/wd"], env).stdout
        assert f"--accelerator-type={accel} --version={runtime}\n" in out
    out = _run([TPU_POD, "--dry_run", *POD, "--accelerator_type=v6e-16", "--runtime_version=v2-custom",
                "--config=configs/mae.py", "--workdir=/mnt/wd"], env).stdout
    assert "--accelerator-type=v6e-16 --version=v2-custom\n" in out


def test_tpu_pod_delete_stop_logs(env):
    assert _commands(_run([TPU_POD, "--dry_run", *POD, "--delete"], env).stdout) == [
        "gcloud compute tpus tpu-vm delete fm-pod --zone=us-central2-b --quiet"]
    assert _commands(_run([TPU_POD, "--dry_run", *POD, "--queued", "--delete"], env).stdout) == [
        "gcloud compute tpus queued-resources delete fm-pod --zone=us-central2-b --force --quiet"]
    assert _commands(_run([TPU_POD, "--dry_run", *POD, "--stop"], env).stdout) == [
        SSH + " --worker=all --command='if [ -f ~/fmjax-train.pid ]; then kill -TERM \"$(cat ~/fmjax-train.pid)\" "
        "2>/dev/null || true; fi'"]
    assert _commands(_run([TPU_POD, "--dry_run", *POD, "--logs"], env).stdout) == [STREAM]
    cmds = _commands(_run([TPU_POD, "--dry_run", *TRAIN, "--delete_after"], env).stdout)
    assert cmds[-2:] == [STREAM, "gcloud compute tpus tpu-vm delete fm-pod --zone=us-central2-b --quiet"]


def test_tpu_pod_help(env):
    proc = _run([TPU_POD, "--help"], env)
    assert proc.stdout.startswith("Usage: launch/tpu_pod.sh") and "--dry_run" in proc.stdout
    assert proc.stderr == ""


@pytest.mark.parametrize("args, named", [
    (TRAIN[1:], "--name"),
    ([TRAIN[0]] + TRAIN[2:], "--zone"),
    (POD + TRAIN[3:], "--accelerator_type"),
    (POD + TRAIN[2:3] + TRAIN[4:], "--config"),
    (TRAIN[:4], "--workdir"),
    (TRAIN + ["--bogus"], "--bogus"),
    (TRAIN + ["--config.total_steps=10"], "after --"),
    (TRAIN + ["--zone"], "needs a value"),
    (TRAIN + ["--spot=yes"], "takes no value"),
    (TRAIN + ["--queued", "--preemptible"], "--spot"),
    (TRAIN + ["--spot", "--preemptible"], "exclude"),
    (POD + ["--delete", "--stop"], "exclude"),
    (POD + ["--delete", "--", "--config.x=1"], "--delete"),
    (POD + ["--accelerator_type=v5e-16"] + TRAIN[3:], "v5litepod-16"),
    (POD + ["--accelerator_type=v9x-8"] + TRAIN[3:], "--runtime_version"),
    (POD + ["--accelerator_type=big"] + TRAIN[3:], "--accelerator_type=big"),
    (TRAIN[:4] + ["--workdir=workdirs/mae"], "relative"),
    (POD + ["--accelerator_type=v4-8", "--config=configs/nope.py", "--workdir=/mnt/wd"], "configs/nope.py"),
    (["--name=Bad_Name"] + TRAIN[1:], "--name=Bad_Name"),
    (TRAIN + ["--env=NOTKEYVALUE"], "--env"),
    (TRAIN + ["--git_ref=main"], "--git_url"),
])
def test_tpu_pod_bad_args(env, args, named):
    line = _usage_error([TPU_POD, "--dry_run", *args], env, named)
    assert line.startswith("tpu_pod.sh: error: ")


@pytest.fixture
def recording_gcloud(tmp_path):
    """A fake gcloud that records each call; `describe` answers FAKE_DESCRIBE (or NOT_FOUND)."""
    fake = tmp_path / "recbin"
    fake.mkdir()
    log = tmp_path / "gcloud.log"
    (fake / "gcloud").write_text(
        "#!/usr/bin/env bash\n"
        f"printf '%s\\n' \"$*\" >> '{log}'\n"
        "if [[ \"$*\" == *' describe '* ]]; then\n"
        "  if [[ -z ${FAKE_DESCRIBE:-} ]]; then echo 'ERROR: (gcloud) NOT_FOUND: Resource not found' >&2; exit 1; fi\n"
        "  printf '%s\\n' \"$FAKE_DESCRIBE\"\n"
        "fi\n")
    (fake / "gcloud").chmod(0o755)

    def run(describe, *args, expect_rc=0):
        e = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_")}
        e.update(PATH=f"{fake}:{os.environ.get('PATH', '/usr/bin:/bin')}", TMPDIR=str(tmp_path))
        if describe:
            e["FAKE_DESCRIBE"] = describe
        if log.exists():
            log.unlink()
        proc = _run([TPU_POD, *TRAIN, "--no_stream", *args], e, expect_rc=expect_rc)
        return proc, [line.split(" ")[3] for line in log.read_text().splitlines()]
    return run


def test_tpu_pod_creates_or_reuses(recording_gcloud):
    """Without --dry_run (gcloud faked): a missing pod is created, a READY one of the type reused."""
    _, verbs = recording_gcloud(None)
    assert verbs == ["describe", "create", "scp", "ssh", "ssh"]
    proc, verbs = recording_gcloud("READY\tv4-32")
    assert verbs == ["describe", "scp", "ssh", "ssh"]
    assert "reusing TPU VM fm-pod (v4-32, READY)" in proc.stderr
    proc, verbs = recording_gcloud("READY\tv4-8", expect_rc=1)
    assert verbs == ["describe"]
    assert proc.stderr.strip().splitlines()[-1] == (
        "tpu_pod.sh: error: TPU VM fm-pod is a v4-8, not a v4-32; pass --accelerator_type=v4-8 or another --name")
    proc, verbs = recording_gcloud("PREEMPTED\tv4-32", expect_rc=1)
    assert verbs == ["describe"] and "is PREEMPTED, not READY" in proc.stderr


# ---------------------------------------------------------------- launch/slurm.sbatch

def test_slurm_dry_run_one_task_per_gpu(env):
    proc = _run(["bash", SLURM, "--dry_run", "--config=configs/mae.py:vit_b16_imagenet", "--workdir=/shared/mae",
                 "--config.total_steps=1000", "--config.data.pp_train=resize(32)|keep('image')"], env)
    assert _commands(proc.stdout) == [
        f"cd {REPO}",
        "srun --nodes=1 --ntasks-per-node=8 --gpu-bind=none --kill-on-bad-exit=1 python launch/train.py "
        "--config=configs/mae.py:vit_b16_imagenet --workdir=/shared/mae --config.total_steps=1000 "
        "--config.data.pp_train='resize(32)|keep('\\''image'\\'')'",
    ]
    srun = shlex.split(_commands(proc.stdout)[1])
    assert srun[-1] == "--config.data.pp_train=resize(32)|keep('image')"


def test_slurm_dry_run_one_task_per_node_from_slurm_env(env):
    env.update(FMJAX_DRY_RUN="1", SLURM_JOB_NUM_NODES="4", SLURM_NTASKS_PER_NODE="1", SLURM_CPUS_PER_TASK="96",
               SLURM_GPUS_ON_NODE="8", SLURM_SUBMIT_DIR=REPO)
    proc = _run(["bash", SLURM, "--config=configs/mae.py"], env)
    assert _commands(proc.stdout)[1] == (
        "srun --nodes=4 --ntasks-per-node=1 --cpus-per-task=96 --gpu-bind=none --kill-on-bad-exit=1 "
        "env JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7 python launch/train.py --config=configs/mae.py")
    env.update(FMJAX_TASKS="gpu", SLURM_NTASKS_PER_NODE="4", SLURM_GPUS_ON_NODE="4", FMJAX_PYTHON="/venv/bin/python")
    proc = _run(["bash", SLURM, "--config=configs/mae.py"], env)
    assert _commands(proc.stdout)[1] == (
        "srun --nodes=4 --ntasks-per-node=4 --cpus-per-task=96 --gpu-bind=none --kill-on-bad-exit=1 "
        "/venv/bin/python launch/train.py --config=configs/mae.py")


def test_slurm_help_and_directives(env):
    proc = _run(["bash", SLURM, "--help"], env)
    assert "sbatch" in proc.stdout and "--dry_run" in proc.stdout
    text = open(SLURM).read()
    for directive in ("#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8", "#SBATCH --signal=TERM@120"):
        assert directive in text


@pytest.mark.parametrize("args, extra_env, named", [
    (["--workdir=/shared/mae"], {}, "--config"),
    (["--config=configs/mae.py", "--dry_run"], {}, "--dry_run goes first"),
    (["--config=configs/mae.py"], {"FMJAX_TASKS": "socket"}, "FMJAX_TASKS"),
    (["--config=configs/mae.py"], {"FMJAX_GPUS_PER_NODE": "x"}, "FMJAX_GPUS_PER_NODE"),
])
def test_slurm_bad_args(env, args, extra_env, named):
    env.update(extra_env)
    line = _usage_error(["bash", SLURM, "--dry_run", *args], env, named)
    assert line.startswith("slurm.sbatch: error: ")


# ---------------------------------------------------------------- launch/xpk.sh, launch/gke/

XPK_ARGS = ["--cluster=my-cluster", "--workload=fmjax-mae", "--tpu_type=v5litepod-16",
            "--config=configs/mae.py:vit_b16_imagenet", "--workdir=gs://bucket/fmjax/mae"]


def test_xpk_dry_run(env):
    proc = _run([XPK, "--dry_run", *XPK_ARGS, "--build", "--max_restarts=3", "--",
                 "--config.total_steps=1000", "--config.model.name=vit b"], env)
    assert _commands(proc.stdout) == [
        f"docker build -f {REPO}/launch/gke/Dockerfile -t fmjax-tpu {REPO}",
        "xpk workload create --cluster=my-cluster --workload=fmjax-mae --tpu-type=v5litepod-16 --num-slices=1 "
        f"--docker-image=fmjax-tpu --script-dir={REPO} --max-restarts=3 --command='python launch/train.py "
        "--config=configs/mae.py:vit_b16_imagenet --workdir=gs://bucket/fmjax/mae --config.total_steps=1000 "
        "--config.model.name='\\''vit b'\\'''",
    ]
    (command,) = [a for a in shlex.split(_commands(proc.stdout)[1]) if a.startswith("--command=")]
    assert shlex.split(command[len("--command="):])[-1] == "--config.model.name=vit b"
    # An image in a registry runs as it is: no --script-dir (xpk refuses it there).
    proc = _run([XPK, "--dry_run", *XPK_ARGS, "--docker_image=us-docker.pkg.dev/p/r/fmjax-tpu:1",
                 "--project=p", "--zone=us-west4-a", "--num_slices=2"], env)
    assert _commands(proc.stdout) == [
        "xpk workload create --cluster=my-cluster --workload=fmjax-mae --project=p --zone=us-west4-a "
        "--tpu-type=v5litepod-16 --num-slices=2 --docker-image=us-docker.pkg.dev/p/r/fmjax-tpu:1 "
        "--command='python launch/train.py --config=configs/mae.py:vit_b16_imagenet --workdir=gs://bucket/fmjax/mae'"]
    proc = _run([XPK, "--dry_run", "--cluster=my-cluster", "--workload=fmjax-mae", "--delete"], env)
    assert _commands(proc.stdout) == ["xpk workload delete --cluster=my-cluster --workload=fmjax-mae"]
    assert _run([XPK, "--help"], env).stdout.startswith("Usage: launch/xpk.sh")


@pytest.mark.parametrize("args, named", [
    (XPK_ARGS[1:], "--cluster"),
    (XPK_ARGS[:2] + XPK_ARGS[3:], "--tpu_type"),
    (XPK_ARGS[:3] + XPK_ARGS[4:], "--config"),
    (XPK_ARGS[:4], "--workdir"),
    (XPK_ARGS[:4] + ["--workdir=rel/wd"], "relative"),
    (XPK_ARGS + ["--num_slices=0"], "--num_slices"),
    (XPK_ARGS + ["--docker_image=gcr.io/p/img", "--build"], "--build"),
    (XPK_ARGS + ["--config.total_steps=5"], "after --"),
    (XPK_ARGS + ["--nope"], "--nope"),
    (["--cluster=c", "--workload=Bad_Name", "--delete"], "--workload=Bad_Name"),
])
def test_xpk_bad_args(env, args, named):
    line = _usage_error([XPK, "--dry_run", *args], env, named)
    assert line.startswith("xpk.sh: error: ")


def test_jobset_manifest():
    text = open(JOBSET).read()
    try:
        import yaml
    except ImportError:  # the checks below need a parser; without one, check the key lines
        for key in ("kind: JobSet", "apiVersion: jobset.x-k8s.io/", "launch/train.py", "google.com/tpu:"):
            assert key in text
        return
    doc = yaml.safe_load(text)
    assert doc["apiVersion"].startswith("jobset.x-k8s.io/") and doc["kind"] == "JobSet"
    (rjob,) = doc["spec"]["replicatedJobs"]
    job = rjob["template"]["spec"]
    pod = job["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"][:2] == ["python", "launch/train.py"]
    assert any(a.startswith("--config=configs/") for a in container["command"])
    assert "--workdir=${WORKDIR}" in container["command"] and container["image"] == "${IMAGE}"
    selector = pod["nodeSelector"]
    rows, cols = map(int, selector["cloud.google.com/gke-tpu-topology"].split("x"))
    chips = container["resources"]["limits"]["google.com/tpu"]
    assert job["parallelism"] == job["completions"] and job["parallelism"] * chips == rows * cols
    assert selector["cloud.google.com/gke-tpu-accelerator"] == "tpu-v5-lite-podslice"
    assert pod["restartPolicy"] == "Never" and pod["terminationGracePeriodSeconds"] > 0


def test_dockerfile_installs_tpu_extra():
    text = open(DOCKERFILE).read()
    assert re.search(r"^FROM python:3\.1[1-9]", text, re.M)  # jax 0.10.2 needs Python >= 3.11
    assert "pip install --no-cache-dir -e '.[tpu]'" in text and "WORKDIR /app" in text


# ---------------------------------------------------------------- setup.py, README, scripts

def _extras():
    tree = ast.parse(open(os.path.join(REPO, "setup.py")).read())
    (call,) = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup"]
    (kw,) = [k for k in call.keywords if k.arg == "extras_require"]
    return ast.literal_eval(kw.value)


def test_setup_extras():
    extras = _extras()
    gcs = ["gcsfs", "google-cloud-storage"]  # gs:// workdirs and data
    assert extras["tpu"] == ["jax[tpu]==0.10.2", "libtpu==0.0.42.*"] + gcs
    assert extras["cuda"] == ["jax[cuda12]==0.10.2"] + gcs
    assert extras["gcs"] == gcs
    assert extras["aot"] == ["libtpu==0.0.42.*"]  # the same libtpu as [tpu]
    assert {"dev", "notebooks", "aot", "tf"} <= set(extras)


def _readme_section():
    text = open(os.path.join(REPO, "README.md")).read()
    assert text.splitlines()[6:8] == [
        "pip install -e '.[dev]' && python launch/train.py --config=configs/mae.py      "
        "# trains MAE on the bundled shapes data",
        "python -m pytest -q -n 2 --dist loadfile tests                                 "
        "# runs the test suite (CPU, 2 workers; -m \"not slow\": the fast subset)",
    ]
    section = text.split("\n## From laptop to pod\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    return [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]


def test_readme_commands_pass_dry_run(env):
    """Every command of README's "From laptop to pod" parses: each launcher line runs with --dry_run."""
    commands = _readme_section()
    assert commands[0] == "python launch/train.py --config=configs/mae.py"
    seen = set()
    for command in commands[1:]:
        argv = shlex.split(command)
        if argv[0] == "sbatch":
            script = argv.index("launch/slurm.sbatch")
            argv = ["bash", SLURM, "--dry_run", *argv[script + 1:]]
        else:
            assert argv[0] in ("launch/tpu_pod.sh", "launch/xpk.sh"), command
            argv = [os.path.join(REPO, argv[0]), "--dry_run", *argv[1:]]
        assert _commands(_run(argv, env).stdout)
        seen.add(os.path.basename(argv[1] if argv[0] == "bash" else argv[0]))
    assert seen == {"tpu_pod.sh", "slurm.sbatch", "xpk.sh"}


@pytest.mark.parametrize("script", [TPU_POD, SLURM, XPK])
def test_scripts_parse_and_lint(script):
    assert os.access(script, os.X_OK)
    assert open(script).readline() == "#!/usr/bin/env bash\n"
    subprocess.run(["bash", "-n", script], check=True, timeout=30)
    if shutil.which("shellcheck"):
        proc = subprocess.run(["shellcheck", script], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stdout
