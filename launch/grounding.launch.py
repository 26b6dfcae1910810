"""Start the csref_ros grounding node (a lifecycle node that configures and activates itself).

    ros2 launch csref_ros grounding.launch.py model_checkpoint:=/path/to/checkpoint \
        image_topic:=/camera/color/image_raw namespace:=robot1

Parameters come from params_file (default: the installed config/grounding.yaml); each argument
below that is given a value overrides the parameter of the same name. Speech comes from the
default microphone unless audio_source:=file or audio_source:=topic (audio_common_msgs/AudioStamped).
"""

from launch import LaunchContext, LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import LifecycleNode
from launch_ros.substitutions import FindPackageShare

# Node parameters settable from the command line; empty = keep the params_file value.
PARAMETER_ARGUMENTS = {
    "image_topic": "sensor_msgs/Image topic of the camera",
    "model_checkpoint": "Checkpoint directory (model.safetensors + config.yaml) or official CSRef .pth",
    "model_config": "Model config for an official .pth: base, tiny or a YAML path",
    "backend": "Inference backend",
    "audio_source": "microphone, file or topic",
    "audio_file": "WAV file played in real time when audio_source is file",
    "audio_topic": "audio_common_msgs/AudioStamped topic when audio_source is topic",
}


def grounding_node(context: LaunchContext) -> list[LifecycleNode]:
    overrides = {name: LaunchConfiguration(name).perform(context) for name in PARAMETER_ARGUMENTS}
    return [
        LifecycleNode(
            package="csref_ros",
            executable="grounding_node",
            name="grounding_node",
            namespace=LaunchConfiguration("namespace"),
            parameters=[LaunchConfiguration("params_file"), {k: v for k, v in overrides.items() if v}],
            output="screen",
            emulate_tty=True,
        )
    ]


def generate_launch_description() -> LaunchDescription:
    arguments = [
        DeclareLaunchArgument("namespace", default_value="", description="Namespace of the node and its topics"),
        DeclareLaunchArgument(
            "params_file",
            default_value=PathJoinSubstitution([FindPackageShare("csref_ros"), "config", "grounding.yaml"]),
            description="YAML parameters file of the node",
        ),
        *(DeclareLaunchArgument(name, default_value="", description=text) for name, text in PARAMETER_ARGUMENTS.items()),
    ]
    return LaunchDescription([*arguments, OpaqueFunction(function=grounding_node)])
