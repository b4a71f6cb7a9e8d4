"""fmjax: JAX/Flax pretraining of vision foundation models."""
from setuptools import find_packages, setup

setup(
    name="fmjax",
    version="0.1.0",
    description="JAX/Flax research codebase for pretraining vision foundation models.",
    packages=find_packages(include=["fmjax", "fmjax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.4.35",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "chex>=0.1.87",
        "ml-collections>=1.0",
        "tensorflow-datasets>=4.9.7",
        "grain>=0.2.10",
        "numpy>=1.26",
        # jax's own requirement is >=0.5. 0.7.0's C extension takes 0.6 s to import (600 ms in
        # numpy's PyUFunc_AddLoop, measured 2026-12-07 with numpy 2.1-2.4; 0.5.4 / 0.6.0 take
        # 5-7 ms): half the start-up of every launcher, and ~20% of the CLI-heavy tests' time.
        "ml_dtypes>=0.5,<0.7",
        "pillow>=10.0",
        "absl-py>=2.0",
        "tensorboardX>=2.6",  # TensorBoard event files without TensorFlow
        "safetensors>=0.4",
    ],
    extras_require={
        # Tests (pytest-xdist: the suite runs on 2 workers) and the PyTorch parity references (CPU torch wheel).
        "dev": ["pytest>=8", "pytest-xdist>=3", "torch==2.13.0", "transformers>=4.45", "diffusers>=0.30"],
        # The notebooks draw with matplotlib when it is there (else plain PIL images).
        "notebooks": ["matplotlib"],
        # Ahead-of-time compilation for TPU topologies on any host (launch/compile.py): the
        # libtpu that jax 0.10.2 pins. Kept out of 'dev': on a CPU-only machine an installed libtpu
        # makes every jax start-up probe for a TPU VM (and warn) unless JAX_PLATFORMS=cpu.
        "aot": ["libtpu==0.0.42.*"],
        # Preparing TFDS catalog datasets (imagenet2012, ...) needs TensorFlow.
        "tf": ["tensorflow-cpu"],
        # Cloud TPU VMs (launch/tpu_pod.sh, launch/gke/Dockerfile): jax 0.10.2 with its TPU extra,
        # which pins libtpu==0.0.42.* (listed too, the same pin as 'aot'). jax 0.10.2 needs Python >= 3.11.
        # gcsfs + google-cloud-storage: gs:// workdirs and data (etils.epath reads gs:// through
        # fsspec's gcsfs; Orbax asks the GCS API about the bucket before writing checkpoints there).
        "gcs": ["gcsfs", "google-cloud-storage"],
        "tpu": ["jax[tpu]==0.10.2", "libtpu==0.0.42.*", "gcsfs", "google-cloud-storage"],
        # NVIDIA GPUs (launch/slurm.sbatch): jax 0.10.2 with the CUDA 12 plugin and the CUDA / cuDNN
        # / NCCL libraries from pip (jax[cuda12] = jaxlib 0.10.2 + jax-cuda12-plugin[with-cuda] 0.10.2).
        "cuda": ["jax[cuda12]==0.10.2", "gcsfs", "google-cloud-storage"],
    },
)
