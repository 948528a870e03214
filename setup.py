"""pip install of the pure-Python part of mossv_ros (engine, CLI, ROS layer) and the
``mossv-ros`` console script. The interfaces (msg/srv) are built by CMake (see README)."""
from setuptools import find_packages, setup

setup(
    name='mossv_ros',
    version='0.1.0',
    description='Real-time video assistant (MOSS-Video-Preview) for ROS 2',
    license='Apache-2.0',
    python_requires='>=3.10',
    packages=find_packages(include=['mossv_ros', 'mossv_ros.*']),
    package_data={'mossv_ros': ['data/*', 'data/**/*']},
    install_requires=[
        # torch is deliberately not listed: install the build that fits the robot (CUDA) or
        # torch==2.13.0 (CPU) yourself; an unpinned torch pulls a multi-GB CUDA build.
        'numpy', 'pyyaml', 'opencv-python-headless', 'transformers>=5.0', 'tokenizers',
        'safetensors', 'tqdm', 'rich', 'rosbags', 'rosbags-image',
    ],
    entry_points={'console_scripts': ['mossv-ros = mossv_ros.fast_exit:cli']},
)
