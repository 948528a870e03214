"""The ``mossv-ros`` command: run the node, the demo, and ask questions.

No ``ros2`` CLI exists without a distro, so these are the tools (``ros2 launch`` / ``ros2 run``
work too on a robot with ROS 2; see README).
"""
import argparse
import logging
from pathlib import Path
import sys
from typing import List, Optional

from .engine.config import QUANTIZATIONS
from .model_dirs import default_model_dir


def _ros_args(params_file: Optional[str], overrides: List[str]) -> List[str]:
    from .ros.params import default_params_file
    args = ['--ros-args', '--params-file', str(params_file or default_params_file())]
    for item in overrides:
        args += ['-p', item]
    return args


def cmd_run(ns) -> int:
    overrides = []
    if ns.model:
        overrides.append(f'model.path:={ns.model}')
    if ns.device:
        overrides.append(f'engine.device:={ns.device}')
    if ns.quantization:
        overrides.append(f'model.quantization:={ns.quantization}')
    from .ros.main import main
    return main(args=[sys.argv[0]] + _ros_args(ns.params_file, overrides) + ns.ros_args)


def cmd_demo(ns) -> int:
    from .demo import DEMO_EPISODE_SEED, run_demo
    ns.seed = DEMO_EPISODE_SEED if ns.seed is None else ns.seed
    return run_demo(ns)


def cmd_ask(ns) -> int:
    from .ros.client import ask
    return ask(ns.prompt, node=ns.node, timeout_sec=ns.timeout, camera=ns.camera,
               follow=ns.follow)


def cmd_offline(ns) -> int:
    """Answer one question about a video file or images, no ROS (docs/model.md section 6.3)."""
    import cv2

    from .engine.config import EngineConfig, SamplingConfig
    from .engine.offline import offline_generate, read_video
    from .engine.runner import ModelRunner

    if bool(ns.video) == bool(ns.image):
        raise ValueError('give exactly one of --video PATH or --image PATH [--image PATH ...]')
    runner = ModelRunner(EngineConfig(  # device and dtype: 'auto' unless --device is given
        model_path=ns.model or str(default_model_dir()), device=ns.device or 'auto',
        max_frames=ns.max_frames, quantization=ns.quantization or 'none'))
    if ns.video:
        frames, _ = read_video(ns.video, ns.fps, min(8, ns.max_frames), ns.max_frames)
    else:
        frames = []
        for path in ns.image:
            bgr = cv2.imread(path, cv2.IMREAD_COLOR)
            if bgr is None:
                raise ValueError(f'cannot read image {path}')
            frames.append(bgr[:, :, ::-1].copy())
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=ns.max_new_tokens)
    res = offline_generate(runner, ns.question, frames, sampling, ns.chunk,
                           on_token=lambda t: print(t, end='', flush=True))
    print(f'\n--- {res.num_frames} frames, encode {res.encode_s:.2f} s, '
          f'TTFT {res.ttft_s:.2f} s, {len(res.token_ids)} tokens, stop: {res.stop_reason}')
    return 0


def cmd_plan(ns) -> int:
    """Print the memory plan of a configuration without loading a weight (:mod:`.engine.
    memory`): from config.json and the parameters; with --memory-gib (or a CUDA device here)
    whether it fits and what would; with --table what fits on common cards."""
    from .engine import memory
    shape = memory.model_shape(ns.model)
    dtype = ns.dtype or ('bfloat16' if ns.device.startswith('cuda') else 'float32')
    available = int(ns.memory_gib * memory.GIB) if ns.memory_gib else 0
    if not available and ns.device.startswith('cuda'):
        import torch
        if torch.cuda.is_available():
            available = memory.device_budget(ns.device, 0)[0]
    plan = memory.plan(shape, ns.quantization, dtype, ns.device, ns.cameras, ns.max_frames,
                       ns.max_context_tokens, available)
    print(plan.describe())
    if not plan.fits:
        fixes = memory.suggest(shape, plan)
        print('would fit: ' + (' | '.join(fixes) if fixes else 'nothing (the model alone is '
                                                             'larger)'))
    if ns.table:
        table = memory.fit_table(shape, dtype, max_frames=ns.max_frames,
                                 max_context_tokens=ns.max_context_tokens)
        cards = list(next(iter(table.values())))
        print('\n| configuration | ' + ' | '.join(cards) + ' |')
        print('|---|' + '---|' * len(cards))
        for row, fits in table.items():
            print(f'| {row} | ' + ' | '.join(fits.values()) + ' |')
    return 0 if plan.fits else 1


def cmd_bag_from_video(ns) -> int:
    from tqdm import tqdm

    from .bag import from_video, parse_question
    questions = [parse_question(q) for q in ns.question]
    with tqdm(desc=f'writing {ns.out_bag}', unit='frame') as bar:
        summary = from_video(ns.video, ns.out_bag, questions, storage=ns.storage,
                             compressed=ns.compressed,
                             image_topic=ns.image_topic or ('/image/compressed' if ns.compressed
                                                            else '/image'),
                             question_topic=ns.question_topic, frame_id=ns.frame_id,
                             fps=ns.fps, width=ns.width,
                             progress=lambda n: bar.update(n - bar.n))
    span = (summary.end_ns - summary.start_ns) * 1e-9
    print(f'wrote {summary.path} ({ns.storage}): '
          + ', '.join(f'{t}: {n}' for t, n in summary.counts.items()) + f'; {span:.2f} s')
    return 0


def cmd_bag_play(ns) -> int:
    import rclpy

    from .bag import parse_remaps, play
    remap = parse_remaps(ns.remap)
    from rclpy.signals import SignalHandlerOptions
    # No rclpy signal handler: Ctrl-C must raise KeyboardInterrupt here, not shut the
    # context down under a publish (which raised RCLError with a traceback, exit 1).
    rclpy.init(args=['mossv-ros'] + ns.ros_args, signal_handler_options=SignalHandlerOptions.NO)
    try:
        result = play(ns.bag, rate=ns.rate, clock=ns.clock, remap=remap, delay=ns.delay,
                      wait_for_subscribers=ns.wait_for_subscribers)
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        return 130
    finally:
        rclpy.try_shutdown()
    tag = f'; questions asked as <request_id>@{result.request_tag}' if result.request_tag else ''
    print(f'played {ns.bag} in {result.wall_s:.2f} s: '
          + ', '.join(f'{t}: {n}' for t, n in result.counts.items()) + tag)
    return 0


def cmd_toyworld_train(ns) -> int:
    from .toyworld.train import train, TrainConfig
    cfg = TrainConfig()
    cfg.seed = cfg.seed if ns.seed is None else ns.seed
    cfg.steps = ns.steps or cfg.steps
    cfg.batch_size = ns.batch_size or cfg.batch_size
    info = train(Path(ns.out), cfg)
    print(f'wrote {ns.out}: {info["parameters"]} parameters, {info["wall_sec"]:.0f} s, '
          f'final loss {info["final_loss"]:.4f}; loss curve {Path(ns.out) / "loss.png"}')
    return 0


def _seed_base(ns) -> int:
    from .toyworld.world import EVAL_SEED_BASE
    return EVAL_SEED_BASE if ns.seed_base is None else ns.seed_base


def cmd_toyworld_eval(ns) -> int:
    import json

    from .toyworld import evaluate as tw
    model = Path(ns.model) if ns.model else default_model_dir()
    episodes = tw.eval_episodes(ns.episodes, seed_base=_seed_base(ns))
    metrics, said = tw.evaluate(model, episodes)
    if ns.json:
        tw.write_report(Path(ns.json), metrics, said)
    if ns.contact_sheet:
        from .toyworld.contact import contact_sheet
        contact_sheet(episodes[0], said[0], Path(ns.contact_sheet))
    print(json.dumps(metrics, indent=1))
    targets = tw.meets_targets(metrics)
    print('targets: ' + ', '.join(f'{k} {"PASS" if v else "MISS"}' for k, v in targets.items()))
    return 0 if all(targets.values()) or not ns.strict else 1


def cmd_toyworld_bag(ns) -> int:
    from .toyworld.evaluate import eval_episodes
    from .toyworld.rosbag import write_episodes_bag
    summary = write_episodes_bag(eval_episodes(ns.episodes, seed_base=_seed_base(ns)),
                                 ns.out_bag, storage=ns.storage)
    print(f'wrote {summary.path}: ' + ', '.join(f'{t}: {n}' for t, n in summary.counts.items()))
    return 0


def _positive(kind):
    """argparse type: a finite number > 0 of ``kind`` (int or float)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'{text!r} is not a number') from None
        if not (value > 0 and value < float('inf')):
            raise argparse.ArgumentTypeError(f'{text!r} must be > 0')
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='mossv-ros', description=__doc__)
    sub = parser.add_subparsers(dest='command', required=True)
    run = sub.add_parser('run', help='start the assistant node (as assistant.launch.py does)')
    run.add_argument('--params-file', help='ROS parameters YAML (default config/assistant.yaml)')
    run.add_argument('--model', help='checkpoint directory (overrides model.path)')
    run.add_argument('--device', help='auto, cpu, cuda or cuda:N (overrides engine.device)')
    run.add_argument('--quantization', choices=QUANTIZATIONS,
                     help='linear-layer weights (overrides model.quantization)')
    run.set_defaults(func=cmd_run)
    plan = sub.add_parser(
        'plan', help='print the GPU memory a configuration needs, without loading anything',
        epilog='exit codes: 0 fits (or no memory figure to compare with), 1 does not fit, '
        '2 bad arguments or checkpoint')
    plan.add_argument('--model', required=True, help='checkpoint directory (its config.json)')
    plan.add_argument('--quantization', choices=QUANTIZATIONS, default='none')
    plan.add_argument('--cameras', type=_positive(int), default=1, help='camera sessions')
    plan.add_argument('--device', default='cuda', help='cpu or cuda[:N] (default cuda)')
    plan.add_argument('--dtype', choices=['bfloat16', 'float16', 'float32'],
                      help='model dtype (default bfloat16 on CUDA, float32 on the CPU)')
    plan.add_argument('--max-frames', type=_positive(int), default=256,
                      help='cache.max_frames')
    plan.add_argument('--max-context-tokens', type=_positive(int), default=4096,
                      help='cache.max_context_tokens')
    plan.add_argument('--memory-gib', type=float, default=0.0,
                      help='memory the node may use, GiB (default: the free memory of a CUDA '
                      'device here, else no comparison)')
    plan.add_argument('--table', action='store_true',
                      help='also print what fits on 16, 24, 32 and 80 GiB cards per mode and '
                      'number of cameras')
    plan.set_defaults(func=cmd_plan)
    demo = sub.add_parser('demo', help='the embedded default: a toyworld episode answered by '
                          'the shipped toyworld model')
    demo.add_argument('--video', help='play this video file (tiny random model) instead')
    demo.add_argument('--scene', action='store_true',
                      help='play a toyworld episode through a 320x240 camera (tiny random '
                      'model) instead')
    demo.add_argument('--model', help='checkpoint directory (default: shipped toyworld model; '
                      'tiny random model with --video/--scene)')
    demo.add_argument('--seed', type=int, default=None,
                      help='toyworld episode seed (default: a held-out demo episode)')
    demo.add_argument('--speed', type=float, default=2.0,
                      help='toyworld: play this many times faster than real time')
    demo.add_argument('--contact-sheet', default='mossv_demo_contact.png',
                      help="toyworld: PNG of the frames and what was said ('' = none)")
    demo.add_argument('--question', default='What do you see?',
                      help='--video/--scene: scripted question')
    demo.add_argument('--ask-at', type=float, default=3.0,
                      help='--video/--scene: seconds into the clip')
    demo.add_argument('--duration', type=float, default=20.0, help='seconds of clip to play')
    demo.add_argument('--fps', type=float, default=10.0, help='camera rate of the published clip')
    demo.set_defaults(func=cmd_demo)
    ask = sub.add_parser(
        'ask', help='ask the running assistant and print the streamed answer',
        description='Ask the running assistant (~/ask) and print the answer as it streams. '
        'Returns once the first utterance of the answer is complete; with --follow, once the '
        'round ends (it stays open for round.close_after_frames silent frames in case the '
        'model revises its answer).',
        epilog='exit codes: 0 answered (or, with --follow, the round ended; a final Answer '
        'that says the model stayed silent is an answer too), 1 rejected or cancelled '
        '(the reason is printed), 2 no answer within --timeout, or no assistant node.')
    ask.add_argument('prompt')
    ask.add_argument('--node', default='/mossv_assistant', help='the assistant node name')
    ask.add_argument('--timeout', type=float, default=60.0,
                     help='seconds to wait for the answer (default: %(default)s)')
    ask.add_argument('--follow', action='store_true',
                     help='also print the revisions, until the round ends')
    ask.add_argument('--camera', default='',
                     help="which camera (cameras.names); '' = the default (first) camera")
    ask.set_defaults(func=cmd_ask)
    bag = sub.add_parser('bag', help='rosbag2 tools: from-video, play')
    bag_sub = bag.add_subparsers(dest='bag_command', required=True)
    fv = bag_sub.add_parser('from-video', help='write a rosbag2 from a video file')
    fv.add_argument('video')
    fv.add_argument('out_bag')
    fv.add_argument('--question', action='append', default=[], metavar='SEC:TEXT',
                    help='a Question at SEC seconds into the clip (repeatable)')
    fv.add_argument('--storage', choices=['mcap', 'sqlite3'], default='mcap',
                    help='rosbag2 storage (mcap: the default since Iron)')
    fv.add_argument('--compressed', action='store_true',
                    help='sensor_msgs/CompressedImage (JPEG) instead of Image (bgr8)')
    fv.add_argument('--image-topic', default=None,
                    help='default /image, or /image/compressed with --compressed '
                    '(image_transport naming; the node: -p topics.transport:=compressed)')
    fv.add_argument('--question-topic', default='/mossv_assistant/question')
    fv.add_argument('--frame-id', default='camera')
    fv.add_argument('--fps', type=_positive(float),
                    help='keep at most this many frames per second')
    fv.add_argument('--width', type=_positive(int),
                    help='resize frames to this width (aspect kept)')
    fv.set_defaults(func=cmd_bag_from_video)
    pl = bag_sub.add_parser('play', help='replay a rosbag2 (like ros2 bag play)')
    pl.add_argument('bag')
    pl.add_argument('--rate', type=_positive(float), default=1.0, help='playback speed factor')
    pl.add_argument('--clock', action='store_true', help='publish /clock (use_sim_time)')
    pl.add_argument('--remap', action='append', default=[], metavar='FROM:=TO')
    pl.add_argument('--delay', type=float, default=0.5,
                    help='seconds to wait after creating publishers (discovery)')
    pl.add_argument('--wait-for-subscribers', type=float, default=0.0, metavar='SEC',
                    help='wait up to SEC seconds until every topic has a subscriber')
    pl.set_defaults(func=cmd_bag_play)
    off = sub.add_parser('offline', help='answer a question about a video file or images '
                         '(no ROS, whole clip at once)')
    off.add_argument('question')
    off.add_argument('--video', help='video file, sampled at --fps')
    off.add_argument('--image', action='append', help='image file (repeatable)')
    off.add_argument('--model', help='checkpoint directory (default: shipped tiny model)')
    off.add_argument('--quantization', choices=QUANTIZATIONS, default='none',
                     help='linear-layer weights: none, int8, fp8 (CUDA 8.9+), int4 (CUDA)')
    off.add_argument('--device', help='auto, cpu, cuda or cuda:N (default auto: cuda when '
                     'available)')
    off.add_argument('--fps', type=_positive(float), default=1.0,
                     help='frames sampled per video second')
    off.add_argument('--max-frames', type=_positive(int), default=256,
                     help='at most this many frames')
    off.add_argument('--chunk', type=_positive(int), default=64, help='frames per vision forward')
    off.add_argument('--max-new-tokens', type=_positive(int), default=256)
    off.set_defaults(func=cmd_offline)
    tw = sub.add_parser('toyworld', help='the toyworld model: train, eval, bag')
    tw_sub = tw.add_subparsers(dest='toyworld_command', required=True)
    tr = tw_sub.add_parser('train', help='train the tiny MOSS architecture on toyworld (CPU)')
    tr.add_argument('--out', required=True, help='checkpoint directory to write')
    tr.add_argument('--seed', type=int, default=None, help='default: TrainConfig.seed')
    tr.add_argument('--steps', type=int, default=None, help='default: TrainConfig.steps')
    tr.add_argument('--batch-size', type=int, default=None)
    tr.set_defaults(func=cmd_toyworld_train)
    ev = tw_sub.add_parser('eval', help='score a model on held-out episodes via the engine')
    ev.add_argument('--model', help='checkpoint directory (default: the shipped toyworld model)')
    ev.add_argument('--episodes', type=int, default=200)
    ev.add_argument('--seed-base', type=int, default=None,
                    help='first held-out seed (default: toyworld.world.EVAL_SEED_BASE)')
    ev.add_argument('--json', help='write metrics and utterances here')
    ev.add_argument('--contact-sheet', help='PNG of episode 0 frames with what was said')
    ev.add_argument('--strict', action='store_true', help='exit 1 if a target is missed')
    ev.set_defaults(func=cmd_toyworld_eval)
    bg = tw_sub.add_parser('bag', help='write held-out episodes as a rosbag2 (ROS eval)')
    bg.add_argument('out_bag')
    bg.add_argument('--episodes', type=int, default=10)
    bg.add_argument('--seed-base', type=int, default=None,
                    help='first held-out seed (default: toyworld.world.EVAL_SEED_BASE)')
    bg.add_argument('--storage', choices=['mcap', 'sqlite3'], default='mcap')
    bg.set_defaults(func=cmd_toyworld_bag)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format='[%(levelname)s] %(name)s: %(message)s')
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything from --ros-args on goes to ROS, e.g. --ros-args -r image:=/camera/image_raw
    split = argv.index('--ros-args') if '--ros-args' in argv else len(argv)
    ns = build_parser().parse_args(argv[:split])
    ns.ros_args = argv[split:]
    try:
        return int(ns.func(ns) or 0)
    except (ValueError, OSError) as exc:  # bad input (CheckpointError is a ValueError too)
        print(f'mossv-ros {ns.command}: error: {exc}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == '__main__':  # (python -m mossv_ros.cli: the tests' way in)
    from mossv_ros.fast_exit import exit_now
    exit_now(main())
