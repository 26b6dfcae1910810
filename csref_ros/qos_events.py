"""rclpy's QoS event types, under their Iron-and-later module name or Humble's.

rclpy.event_handler is the module since Iron; Humble (JetPack 6 robots) has the same classes in
rclpy.qos_event, which later releases keep only as a deprecated alias. Import them from here.
"""

try:
    from rclpy.event_handler import QoSMessageLostInfo, QoSRequestedIncompatibleQoSInfo, SubscriptionEventCallbacks
except ImportError:  # Humble
    from rclpy.qos_event import QoSMessageLostInfo, QoSRequestedIncompatibleQoSInfo, SubscriptionEventCallbacks

__all__ = ["QoSMessageLostInfo", "QoSRequestedIncompatibleQoSInfo", "SubscriptionEventCallbacks"]
