"""mossv_ros: a real-time video assistant (MOSS-Video-Preview) for ROS 2.

The hand-written modules and the rosidl-generated ``mossv_ros.msg`` / ``mossv_ros.srv`` may be
installed in two folders (a development checkout beside a built interface package); extending
``__path__`` lets both import as one package. In an installed package they share one folder.
"""
from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)
__version__ = '0.1.0'
