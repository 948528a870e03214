"""ROS parameters <-> :class:`~mossv_ros.engine.config.EngineConfig` (one source of truth).

The node declares every parameter of ``config/assistant.yaml`` with the engine's defaults;
this module maps the dotted ROS names onto engine fields.
"""
from pathlib import Path
import sys

from ..engine.config import EngineConfig, SamplingConfig

#: dotted ROS parameter name -> EngineConfig field (``sampling.*`` -> SamplingConfig field).
PARAM_TO_FIELD = {
    'model.path': 'model_path',
    'model.trust_remote_code': 'trust_remote_code',
    'engine.dtype': 'dtype',
    'engine.device': 'device',
    'engine.attn_implementation': 'attn_implementation',
    'engine.cpu_threads': 'cpu_threads',
    'frames.rate_hz': 'frame_rate_hz',
    'frames.max_queue': 'max_frame_queue',
    'frames.reset_after_gap_sec': 'reset_after_gap_sec',
    'cache.max_frames': 'max_frames',
    'cache.num_sink_frames': 'num_sink_frames',
    'cache.eviction_policy': 'eviction_policy',
    'cache.max_context_tokens': 'max_context_tokens',
    'cache.max_memory_bytes': 'max_memory_bytes',
    'prompt.max_chars': 'max_prompt_chars',
    'prompt.max_pending': 'max_pending_questions',
    'round.close_after_frames': 'round_close_after_frames',
}
SAMPLING_PARAMS = ('temperature', 'top_k', 'top_p', 'repetition_penalty', 'max_new_tokens',
                   'seed')

#: Node-only parameters (not engine fields) and their defaults.
NODE_DEFAULTS = {
    'topics.images': ['image'],
    'topics.compressed_images': [''],
    'qos.image_reliability': 'best_effort',
    'status.period_sec': 1.0,
    'time.reset_on_backwards_stamp': True,
}


def engine_defaults() -> dict:
    """Dotted parameter name -> default value, from the EngineConfig dataclass."""
    base, sampling = EngineConfig(), SamplingConfig()
    out = {name: getattr(base, field) for name, field in PARAM_TO_FIELD.items()}
    out['engine.dtype'] = 'bfloat16'
    out['engine.device'] = 'cuda'
    out.update({f'sampling.{k}': getattr(sampling, k) for k in SAMPLING_PARAMS})
    return out


def engine_config_from_params(values: dict) -> EngineConfig:
    """Build and validate an EngineConfig from dotted parameter values.

    :raises ValueError: naming the parameter, the value and the allowed range.
    """
    fields = {PARAM_TO_FIELD[k]: v for k, v in values.items() if k in PARAM_TO_FIELD}
    fields['sampling'] = {k: values[f'sampling.{k}'] for k in SAMPLING_PARAMS
                          if f'sampling.{k}' in values}
    return EngineConfig.from_dict(fields)


def flatten_ros_yaml(data: dict) -> dict:
    """``{'/**': {'ros__parameters': {...nested...}}}`` -> {dotted name: value}."""
    out = {}
    for section in data.values():
        params = (section or {}).get('ros__parameters', {})

        def walk(prefix, node):
            for key, value in node.items():
                name = f'{prefix}.{key}' if prefix else key
                if isinstance(value, dict):
                    walk(name, value)
                else:
                    out[name] = value
        walk('', params)
    return out


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
