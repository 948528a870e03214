"""``ros2 param set`` through one gate: the node's parameters read as their declared types,
checked before they are taken (a bad value refused with the reason; a parameter that only a
configure can apply refused while configured), and live ones applied at once. The mapping
onto the engine's configuration is :mod:`.params`.
"""
from .params import (
    coerce_param,
    engine_config_from_params,
    is_live,
    LIVE_NODE_PARAMS,
    live_summary,
    unknown_params,
    validate_node_params,
)


class ParameterGate:
    """The node's parameters as values: read (coerced to their declared types), checked
    before ``ros2 param set`` takes them (a bad value is refused with the reason; a parameter
    that only a configure can apply is refused while configured) and, once taken, applied at
    once where they are live.

    :param node: the :class:`~.node.AssistantNode`.
    :param defaults: dotted name -> default value (the declared types).
    """

    def __init__(self, node, defaults: dict) -> None:
        self._node = node
        self._defaults = defaults

    @classmethod
    def declare(cls, node, defaults: dict) -> 'ParameterGate':
        """Declare every parameter of ``config/assistant.yaml`` on ``node``, dynamically typed
        (a wrong type gets our validation message, not a traceback), warn of unknown ones, and
        put ``ros2 param set`` through the gate. :returns: the gate."""
        from rcl_interfaces.msg import ParameterDescriptor
        from rclpy.parameter import Parameter
        for name, value in defaults.items():
            node.declare_parameter(name, value, ParameterDescriptor(dynamic_typing=True))
        # An empty YAML list (`topics.images: []`) arrives as a NOT_SET override, which
        # rclpy drops in favour of the default: it means "none", so make it an empty list.
        for name, override in node._parameter_overrides.items():
            if (isinstance(defaults.get(name), list)
                    and override.type_ == Parameter.Type.NOT_SET):
                node.set_parameters([Parameter(name, Parameter.Type.STRING_ARRAY, [])])
        unknown = unknown_params(node._parameter_overrides, node._parameters)
        if unknown:
            node.get_logger().warning('unknown parameters, ignored: ' + ', '.join(unknown))
        gate = cls(node, defaults)
        node.add_on_set_parameters_callback(gate.check)
        node.add_post_set_parameters_callback(gate.apply)
        return gate

    def refuse_unknown(self, parameter_list):
        """A SetParametersResult naming each parameter of ``parameter_list`` the node does not
        declare, with the closest declared name; None when all are declared."""
        node = self._node
        unknown = [p.name for p in parameter_list if not node.has_parameter(p.name)]
        if not unknown:
            return None
        from rcl_interfaces.msg import SetParametersResult
        return SetParametersResult(successful=False, reason=(
            'not a parameter of this node: ' + ', '.join(
                unknown_params(unknown, node._parameters)) + ' (ros2 param list names them '
            'all)'))

    def values(self, changes: dict = None) -> dict:
        """Every parameter's value (``changes`` applied), coerced to its declared type.
        :raises ValueError: a value of the wrong type, named."""
        values = {name: self._node.get_parameter(name).value for name in self._defaults}
        values.update(changes or {})
        return {name: coerce_param(name, value, self._defaults[name])
                for name, value in values.items()}

    def value(self, name: str):
        """One parameter, as its declared type. An invalid value (configure refuses it with
        the reason) reads as the default here, so a timer never fails on it."""
        default = self._defaults[name]
        try:
            return coerce_param(name, self._node.get_parameter(name).value, default)
        except ValueError:
            return default

    def check(self, params):
        """``on_set_parameters`` callback: SetParametersResult, with the reason on refusal."""
        from rcl_interfaces.msg import SetParametersResult
        ours = {p.name: p.value for p in params if p.name in self._defaults}
        if not ours:
            return SetParametersResult(successful=True)
        node = self._node
        state = node.lifecycle_state()
        fixed = sorted(name for name in ours if not is_live(name))
        if fixed and (state != 'unconfigured' or node.loading):
            return SetParametersResult(successful=False, reason=(
                f'{", ".join(fixed)} cannot change while the node is {state}: deactivate and '
                'clean up the node (ros2 lifecycle set), set it, then configure again. Live '
                f'parameters: {live_summary(self._defaults)}'))
        try:
            values = self.values(ours)
            engine_config_from_params(values)
            validate_node_params(values)
        except (ValueError, TypeError) as exc:
            return SetParametersResult(successful=False, reason=str(exc))
        return SetParametersResult(successful=True)

    def apply(self, params) -> None:
        """``post_set_parameters`` callback: live parameters apply at once (the Status period,
        the engine's sampling, prompt, round and frame-rate settings); the rest are read at the
        next configure."""
        node = self._node
        names = {p.name for p in params if p.name in self._defaults}
        if not names or node.lifecycle_state() == 'unconfigured':
            return
        if 'status.period_sec' in names and node._node_timers.get('status') is not None:
            node._start_timers('status')
        if node.engine is not None and names - set(LIVE_NODE_PARAMS):
            config = engine_config_from_params(self.values())
            node.engine.update_config(config)
            node.engine_config = config
        node.get_logger().info('parameters applied: ' + ', '.join(sorted(names)))
