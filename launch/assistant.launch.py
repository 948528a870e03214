"""Launch the mossv_ros assistant node: ``ros2 launch mossv_ros assistant.launch.py``."""
import os

from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from launch import LaunchDescription


def generate_launch_description():
    default_params = os.path.join(get_package_share_directory('mossv_ros'), 'config',
                                  'assistant.yaml')
    args = [
        DeclareLaunchArgument('params_file', default_value=default_params,
                              description='ROS parameters YAML'),
        DeclareLaunchArgument('namespace', default_value='', description='node namespace'),
        DeclareLaunchArgument('image_topic', default_value='image',
                              description='camera topic remapped onto the node input'),
        DeclareLaunchArgument('model_path', default_value='',
                              description='local MOSS-Video-Preview checkpoint directory'),
        DeclareLaunchArgument('device', default_value='cuda', description='cpu, cuda, cuda:N'),
    ]
    node = Node(
        package='mossv_ros', executable='assistant_node', name='mossv_assistant',
        namespace=LaunchConfiguration('namespace'), output='screen',
        parameters=[LaunchConfiguration('params_file'),
                    {'model.path': LaunchConfiguration('model_path'),
                     'engine.device': LaunchConfiguration('device')}],
        remappings=[('image', LaunchConfiguration('image_topic'))],
    )
    return LaunchDescription(args + [node])
