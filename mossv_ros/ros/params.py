"""ROS parameters <-> :class:`~mossv_ros.engine.config.EngineConfig` (one source of truth).

The node declares every parameter of ``config/assistant.yaml`` with the engine's defaults;
this module maps the dotted ROS names onto engine fields.
"""
import math
from pathlib import Path
import sys

from ..engine.config import EngineConfig, LIVE_FIELDS, SamplingConfig

#: dotted ROS parameter name -> EngineConfig field (``sampling.*`` -> SamplingConfig field).
PARAM_TO_FIELD = {
    'model.path': 'model_path',
    'model.trust_remote_code': 'trust_remote_code',
    'model.quantization': 'quantization',
    'engine.dtype': 'dtype',
    'engine.device': 'device',
    'engine.attn_implementation': 'attn_implementation',
    'engine.cuda_graphs': 'cuda_graphs',
    'engine.compile': 'compile_mode',
    'engine.cpu_threads': 'cpu_threads',
    'engine.max_device_memory_bytes': 'max_device_memory_bytes',
    'frames.rate_hz': 'frame_rate_hz',
    'frames.max_queue': 'max_frame_queue',
    'frames.reset_after_gap_sec': 'reset_after_gap_sec',
    'cache.max_frames': 'max_frames',
    'cache.num_sink_frames': 'num_sink_frames',
    'cache.eviction_policy': 'eviction_policy',
    'cache.max_context_tokens': 'max_context_tokens',
    'cache.max_memory_bytes': 'max_memory_bytes',
    'cache.max_total_memory_bytes': 'max_total_memory_bytes',
    'prompt.max_chars': 'max_prompt_chars',
    'prompt.max_pending': 'max_pending_questions',
    'round.close_after_frames': 'round_close_after_frames',
    'round.close_after_sec': 'round_close_after_sec',
    'time.reset_on_backwards_stamp': 'reset_on_backwards_stamp',
}
SAMPLING_PARAMS = ('temperature', 'top_k', 'top_p', 'repetition_penalty', 'max_new_tokens',
                   'seed')

#: Node-only parameters (not engine fields) and their defaults.
NODE_DEFAULTS = {
    'topics.images': ['image'],
    'topics.compressed_images': [''],
    'cameras.names': [''],
    'cameras.topics': [''],
    'qos.image_reliability': 'best_effort',
    'status.period_sec': 1.0,
    'topics.transport': 'raw',
    'diagnostics.period_sec': 1.0,
    'diagnostics.camera_stale_sec': 2.0,
}


#: Node parameters applied while the node runs; all others need a new configure.
LIVE_NODE_PARAMS = ('status.period_sec', 'diagnostics.camera_stale_sec')
RELIABILITIES = ('best_effort', 'reliable')
#: image_transport names: 'raw' subscribes sensor_msgs/Image on each of topics.images,
#: 'compressed' sensor_msgs/CompressedImage on ``<topic>/compressed``
TRANSPORTS = ('raw', 'compressed')


def is_live(name: str) -> bool:
    """True if parameter ``name`` may change while the node is configured (applied at once:
    ``EngineConfig`` fields in :data:`~mossv_ros.engine.config.LIVE_FIELDS`, i.e.
    ``sampling.*``, ``prompt.*``, ``round.*``, ``frames.rate_hz``, and ``status.period_sec``)."""
    if name.startswith('sampling.'):
        return 'sampling' in LIVE_FIELDS
    return name in LIVE_NODE_PARAMS or PARAM_TO_FIELD.get(name) in LIVE_FIELDS


def coerce_param(name: str, value, default):
    """``value`` of parameter ``name`` as the type of its ``default`` (the node declares its
    parameters with dynamic typing, so a wrong type gets this message, not rclpy's
    InvalidParameterTypeException traceback): an int where a float is expected is taken
    as that float; an empty YAML list (rclpy: not set) is an empty list.

    :raises ValueError: naming the parameter, the value and the expected type.
    """
    def wrong(expected):
        return ValueError(f'{name}={value!r} is invalid: expected {expected}')
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise wrong('true or false')
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong('a number')
        return float(value)
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong('an integer')
        return value
    if isinstance(default, str):
        if not isinstance(value, str):
            raise wrong('a string')
        return value
    if isinstance(default, list):
        if value is None:
            return []
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise wrong("a list of strings, e.g. ['image']")
        return list(value)
    return value


def unknown_params(given, known) -> list:
    """Sentences naming each of ``given`` (parameter names from a params file or ``-p``)
    that is not in ``known``, with the closest known name (a typo such as
    ``cache.max_frame`` was ignored silently)."""
    import difflib
    out = []
    for name in sorted(set(given) - set(known)):
        if name.startswith('qos_overrides.'):
            continue
        close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.75)
        out.append(f'{name} (did you mean {close[0]}?)' if close else name)
    return out


def live_summary(names) -> str:
    """The live ones of ``names``, a group written ``group.*`` when all of it is live
    (for messages; derived from :func:`is_live`, never a second list)."""
    groups = {}
    for name in names:
        groups.setdefault(name.split('.')[0], []).append(name)
    out = []
    for group, members in groups.items():
        live = [n for n in members if is_live(n)]
        out += [f'{group}.*'] if live and len(live) == len(members) else live
    return ', '.join(out)


def validate_node_params(values: dict) -> None:
    """Check the node-only parameters (:data:`NODE_DEFAULTS`) in dotted ``values``.

    :raises ValueError: naming the parameter, the value and the allowed range.
    """
    period = values.get('status.period_sec', NODE_DEFAULTS['status.period_sec'])
    if not (isinstance(period, (int, float)) and math.isfinite(period)
            and 0.01 <= period <= 3600.0):
        raise ValueError(f'status.period_sec={period!r} is invalid: expected a float in '
                         '[0.01, 3600] (seconds)')
    for name, low in (('diagnostics.period_sec', 0.1), ('diagnostics.camera_stale_sec', 0.01)):
        value = values.get(name, NODE_DEFAULTS[name])
        if not (isinstance(value, (int, float)) and math.isfinite(value)
                and low <= value <= 3600.0):
            raise ValueError(f'{name}={value!r} is invalid: expected a float in [{low}, 3600] '
                             '(seconds)')
    names, topics = camera_topics(values)
    if len(names) != len(topics):
        raise ValueError(f'cameras.names={names!r} and cameras.topics={topics!r} are invalid: '
                         'expected one image topic per camera name, in the same order')
    transport = values.get('topics.transport', NODE_DEFAULTS['topics.transport'])
    if transport not in TRANSPORTS:
        raise ValueError(f'topics.transport={transport!r} is invalid: expected one of '
                         f'{TRANSPORTS}')
    rel = values.get('qos.image_reliability', NODE_DEFAULTS['qos.image_reliability'])
    if rel not in RELIABILITIES:
        raise ValueError(f'qos.image_reliability={rel!r} is invalid: expected one of '
                         f'{RELIABILITIES}')


def camera_topics(values: dict):
    """(names, topics) of ``cameras.names`` / ``cameras.topics`` (empty entries dropped;
    both empty: the single-camera configuration, ``topics.images``)."""
    names = [n for n in values.get('cameras.names', NODE_DEFAULTS['cameras.names']) or [] if n]
    topics = [t for t in values.get('cameras.topics', NODE_DEFAULTS['cameras.topics']) or []
              if t]
    return names, topics


def engine_defaults() -> dict:
    """Dotted parameter name -> default value, from the EngineConfig dataclass."""
    base, sampling = EngineConfig(), SamplingConfig()
    out = {name: getattr(base, field) for name, field in PARAM_TO_FIELD.items()}
    out.update({f'sampling.{k}': getattr(sampling, k) for k in SAMPLING_PARAMS})
    return out


def engine_config_from_params(values: dict) -> EngineConfig:
    """Build and validate an EngineConfig from dotted parameter values.

    :raises ValueError: naming the parameter, the value and the allowed range.
    """
    fields = {PARAM_TO_FIELD[k]: v for k, v in values.items() if k in PARAM_TO_FIELD}
    fields['sampling'] = {k: values[f'sampling.{k}'] for k in SAMPLING_PARAMS
                          if f'sampling.{k}' in values}
    names, _ = camera_topics(values)
    if names:
        fields['cameras'] = tuple(names)
    return EngineConfig.from_dict(fields)


def default_params_file() -> Path:
    """The packaged ``config/assistant.yaml`` (installed share folder or the checkout)."""
    here = Path(__file__).resolve().parents[2] / 'config' / 'assistant.yaml'
    candidates = [here, Path(sys.prefix) / 'share' / 'mossv_ros' / 'config' / 'assistant.yaml']
    try:
        from ament_index_python.packages import get_package_share_directory
        candidates.insert(0, Path(get_package_share_directory('mossv_ros'))
                          / 'config' / 'assistant.yaml')
    except Exception:  # noqa: BLE001 - no ament index (pip install): use the others
        pass
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError('config/assistant.yaml not found; pass --params-file')
