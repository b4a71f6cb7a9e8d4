"""Which environments start ``jax.distributed`` (``maybe_initialize_distributed``): the explicit
coordinator variables, SLURM, a GKE TPU slice, a Cloud TPU VM, and the FMJAX_DISTRIBUTED switch."""
import pytest

from fmjax.parallel import mesh as mesh_lib

VARS = ("FMJAX_DISTRIBUTED", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
        "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES")


@pytest.fixture
def calls(monkeypatch):
    got = []
    monkeypatch.setattr(mesh_lib.jax.distributed, "initialize", lambda **kw: got.append(kw))
    monkeypatch.setattr(mesh_lib, "_on_cloud_tpu_vm", lambda: False)
    for v in VARS:
        monkeypatch.delenv(v, raising=False)
    return got


def test_laptop_does_not_initialise(calls):
    assert mesh_lib.maybe_initialize_distributed() is False and calls == []


def test_explicit_coordinator(calls, monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    assert mesh_lib.maybe_initialize_distributed()
    assert calls == [dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=2)]


@pytest.mark.parametrize("var,value", [("SLURM_NTASKS", "8"), ("TPU_WORKER_HOSTNAMES", "h0,h1,h2,h3"),
                                       ("FMJAX_DISTRIBUTED", "1")])
def test_cluster_detection_is_jax_own(calls, monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    assert mesh_lib.maybe_initialize_distributed() and calls == [{}]


def test_single_slurm_task_and_one_gke_host_stay_local(calls, monkeypatch):
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "h0")
    assert not mesh_lib.maybe_initialize_distributed()


def test_cloud_tpu_vm(calls, monkeypatch):
    monkeypatch.setattr(mesh_lib, "_on_cloud_tpu_vm", lambda: True)
    assert mesh_lib.maybe_initialize_distributed() and calls == [{}]
    monkeypatch.setenv("FMJAX_DISTRIBUTED", "0")  # the switch wins
    assert not mesh_lib.maybe_initialize_distributed() and calls == [{}]


def test_this_machine_is_not_a_tpu_vm():
    assert mesh_lib._on_cloud_tpu_vm() is False
