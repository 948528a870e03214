"""ROS-free streaming engine for MOSS-Video-Preview (never imports rclpy or mossv_ros.msg).

The pure modules (:mod:`.config`, :mod:`.events`, :mod:`.prompt`, :mod:`.policy`) import
neither torch nor rclpy; the model modules import torch and transformers lazily from here.
"""
