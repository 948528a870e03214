"""Launch the mossv_ros assistant node: ``ros2 launch mossv_ros assistant.launch.py``.

Arguments: ``params_file`` (default: the package's ``config/assistant.yaml``), ``namespace``,
``image_topic`` (remapped onto the node's ``image`` input), and ``model_path`` / ``device``,
which override ``model.path`` / ``engine.device`` of the params file only when given: left
empty they leave the file's values alone.
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from launch import LaunchDescription

#: launch argument -> ROS parameter it overrides when given (non-empty)
OVERRIDES = {'model_path': 'model.path', 'device': 'engine.device'}


def _assistant_node(context):
    overrides = {param: LaunchConfiguration(arg).perform(context)
                 for arg, param in OVERRIDES.items()}
    overrides = {param: value for param, value in overrides.items() if value}
    parameters = [LaunchConfiguration('params_file')] + ([overrides] if overrides else [])
    return [Node(
        package='mossv_ros', executable='assistant_node', name='mossv_assistant',
        namespace=LaunchConfiguration('namespace'), output='screen',
        parameters=parameters,
        remappings=[('image', LaunchConfiguration('image_topic'))],
    )]


def generate_launch_description():
    default_params = os.path.join(get_package_share_directory('mossv_ros'), 'config',
                                  'assistant.yaml')
    return LaunchDescription([
        DeclareLaunchArgument('params_file', default_value=default_params,
                              description='ROS parameters YAML'),
        DeclareLaunchArgument('namespace', default_value='', description='node namespace'),
        DeclareLaunchArgument('image_topic', default_value='image',
                              description='camera topic remapped onto the node input'),
        DeclareLaunchArgument('model_path', default_value='',
                              description="local checkpoint directory ('' = the params "
                              "file's model.path)"),
        DeclareLaunchArgument('device', default_value='',
                              description="auto, cpu, cuda, cuda:N ('' = the params file's "
                              'engine.device)'),
        OpaqueFunction(function=_assistant_node),
    ])
