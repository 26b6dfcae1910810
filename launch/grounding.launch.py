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
    "image_topic": "sensor_msgs/Image topic of the camera (relative names resolve in namespace)",
    "use_depth": "true: subscribe to aligned depth + camera_info and publish the target in 3D",
    "depth_topic": "Aligned depth image topic (16UC1 mm or 32FC1 m)",
    "depth_info_topic": "camera_info topic of the depth image",
    "target_frame": "tf2 frame for the 3D output (needs tf2_ros); empty = the camera optical frame",
    "model_checkpoint": "Checkpoint directory (model.safetensors + config.yaml) or official CSRef .pth",
    "model_config": "Model config for an official .pth: base, tiny or a YAML path",
    "backend": "Inference backend",
    "audio_source": "microphone, file or topic",
    "audio_file": "WAV file played in real time when audio_source is file",
    "audio_topic": "audio_common_msgs/AudioStamped topic when audio_source is topic",
}


def grounding_node(context: LaunchContext) -> list[LifecycleNode]:
    overrides = {name: LaunchConfiguration(name).perform(context) for name in PARAMETER_ARGUMENTS}
    # Boolean parameters (use_depth) arrive as text; the node declares them as booleans.
    overrides = {k: {"true": True, "false": False}.get(v.lower(), v) for k, v in overrides.items()}
    return [
        LifecycleNode(
            package="csref_ros",
            executable="grounding_node",
            name="grounding_node",
            namespace=LaunchConfiguration("namespace"),
            parameters=[
                LaunchConfiguration("params_file"),
                {k: v for k, v in overrides.items() if v != ""},
                {"use_sim_time": LaunchConfiguration("use_sim_time").perform(context).lower() == "true"},
            ],
            output="screen",
            emulate_tty=True,
        )
    ]


def generate_launch_description() -> LaunchDescription:
    arguments = [
        DeclareLaunchArgument("namespace", default_value="", description="Namespace of the node and its topics"),
        DeclareLaunchArgument(
            "use_sim_time", default_value="false", description="true: the node's clock follows /clock (bag replay, simulation)"
        ),
        DeclareLaunchArgument(
            "params_file",
            default_value=PathJoinSubstitution([FindPackageShare("csref_ros"), "config", "grounding.yaml"]),
            description="YAML parameters file of the node",
        ),
        *(DeclareLaunchArgument(name, default_value="", description=text) for name, text in PARAMETER_ARGUMENTS.items()),
    ]
    return LaunchDescription([*arguments, OpaqueFunction(function=grounding_node)])
