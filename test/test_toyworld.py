"""Toyworld: world and transcripts follow the MOSS grammar, the training forward equals the
engine's streaming forward, training learns, and the shipped model meets the issue's targets
when streamed through the engine."""
from pathlib import Path

import numpy as np
import pytest
import torch

from mossv_ros.engine import prompt as grammar
from mossv_ros.toyworld import evaluate as tw_eval
from mossv_ros.toyworld.data import build_tokenizer, transcript
from mossv_ros.toyworld.world import make_episode, speech_frames


@pytest.fixture(scope='module')
def tokenizer():
    return build_tokenizer()


def test_world_is_seeded_and_changes():
    a, b, c = make_episode(7), make_episode(7), make_episode(8)
    assert all(np.array_equal(x, y) for x, y in zip(a.frames(), b.frames()))
    assert not all(np.array_equal(x, y) for x, y in zip(a.frames(), c.frames()))
    assert a.frame(0).shape == (112, 112, 3) and a.frame(0).dtype == np.uint8
    assert len({tuple(sorted(s)) for s in a.states}) > 1  # shapes appear/disappear
    assert a.questions and all(q.after_frame < a.num_frames - 1 for q in a.questions)


def test_transcript_grammar(tokenizer):
    tok, sp = tokenizer
    sil, img, eot = sp[grammar.SILENCE], sp[grammar.IMAGE], sp[grammar.EOT]
    for seed in range(20):
        ep = make_episode(seed, interrupt_prob=0.5)
        tr = transcript(ep, tok, sp, silence_weight=0.5)
        ids = tr.ids.tolist()
        assert [ids[p] for p in tr.frame_positions] == [img] * ep.num_frames
        pairs = list(zip(ids, ids[1:]))
        assert (sil, sil) not in pairs and (img, img) not in pairs  # section 5.4
        assert not tr.weights[tr.ids == img].any() and not tr.weights[tr.ids == eot].any()
        prefix = len(tok.encode(grammar.session_start_text(), add_special_tokens=False).ids)
        # (the system prompt itself mentions `<|silence|>`: a prompt token, not a target)
        assert set(tr.weights[prefix:][tr.ids[prefix:] == sil]) == {0.5}
        words = tr.weights == 1.0
        text = tok.decode(tr.ids[words].tolist())
        for _, (_, said, _) in speech_frames(ep):
            if not any(q.interrupt for q in ep.questions):
                assert said in text
    # the prefix is the engine's session start, byte for byte
    prefix = tok.encode(grammar.session_start_text(), add_special_tokens=False).ids
    assert ids[:len(prefix)] == prefix and ids[len(prefix)] == sil


def test_revision_weight_lands_on_the_first_token_of_each_revision(tokenizer):
    """revision_weight changes the weight of exactly one token per revision: the first word
    after the frame that shows the change; tokens and every other weight stay the same."""
    tok, sp = tokenizer
    img = sp[grammar.IMAGE]
    checked = 0
    for seed in range(20):
        ep = make_episode(seed)
        plain = transcript(ep, tok, sp, silence_weight=0.5)
        heavy = transcript(ep, tok, sp, silence_weight=0.5, revision_weight=3.0)
        assert np.array_equal(plain.ids, heavy.ids)
        changed = np.flatnonzero(plain.weights != heavy.weights)
        revisions = [t for t, (_, _, is_revision) in speech_frames(ep) if is_revision]
        # the token right after a revision frame's <|image|> is the revision's first word
        assert changed.tolist() == [int(plain.frame_positions[t]) + 1 for t in revisions]
        assert (heavy.weights[changed] == 3.0).all() and (plain.weights[changed] == 1.0).all()
        assert all(plain.ids[p - 1] == img for p in changed)
        checked += len(revisions)
    assert checked > 10


def test_tokenizer_layout_and_roundtrip(tokenizer, tmp_path):
    from mossv_ros.engine.checkpoint import load_tokenizer, resolve_special_ids
    from mossv_ros.toyworld.data import save_tokenizer

    tok, sp = tokenizer
    assert sp[grammar.VIDEO] == sp[grammar.IMAGE] - 1  # like 128255 / 128256
    save_tokenizer(tok, tmp_path)
    hf = load_tokenizer(tmp_path)
    ids = resolve_special_ids(hf)
    assert ids.image == sp[grammar.IMAGE] and ids.silence == sp[grammar.SILENCE]
    text = 'Now the triangle is yellow.'
    enc = hf.encode(text, add_special_tokens=False)
    assert len(enc) <= 6 and hf.decode(enc) == text
    assert hf.decode(hf.encode('héllo <|silence|>', add_special_tokens=False)) == \
        'héllo <|silence|>'


def test_training_forward_equals_engine_forward(tokenizer):
    """The batched training forward and the engine's streaming feed give the same logits at
    every row of a transcript (frames inserted at their <|image|> tokens)."""
    from mossv_ros.engine.checkpoint import load_tokenizer
    from mossv_ros.engine.config import EngineConfig
    from mossv_ros.engine.runner import ModelRunner
    from mossv_ros.engine.tiny import build_tiny_model
    from mossv_ros.toyworld.data import save_tokenizer
    from mossv_ros.toyworld.train import model_config, TrainConfig, Trainer

    tok, sp = tokenizer
    cfg = TrainConfig(text_hidden=32, text_intermediate=64, vision_hidden=16)
    hf_model = build_tiny_model(model_config(cfg, sp), seed=3)
    trainer = Trainer(hf_model, tok, sp, cfg)
    eps = [make_episode(11, num_frames=6, question_gap=(2, 3), interrupt_prob=0.0),
           make_episode(12, num_frames=8, question_gap=(2, 3), interrupt_prob=0.0)]
    batch = trainer.collate(eps)
    with torch.no_grad():
        train_logits = trainer.logits(batch)

    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        save_tokenizer(tok, Path(tmp))
        hf_tok = load_tokenizer(Path(tmp))
    runner = ModelRunner.from_model(EngineConfig(attn_implementation='eager'), hf_model, hf_tok)
    p = len(trainer.prefix)
    for b, ep in enumerate(eps):
        tr = transcript(ep, tok, sp, cfg.silence_weight, seed=ep.seed)
        session = runner.new_session()
        runner.start_session(session)
        frames = runner.encode_frames(ep.frames())
        by_pos = {int(pos): f for pos, f in zip(tr.frame_positions, frames)}
        worst = 0.0
        for i in range(p + 1, len(tr.ids)):  # row p is the prefix's last token (fed above)
            tok_id = int(tr.ids[i])
            fr = [(0, by_pos[i])] if i in by_pos else []
            logits = runner.feed(session, [tok_id], fr)
            worst = max(worst, float((logits - train_logits[b, i - p]).abs().max()))
        assert worst < 1e-4, worst


def test_scoring_is_not_trivial():
    """Perfect utterances score 1; a silent model misses every answer and revision; a model
    that speaks at every frame has a false-speak rate of 1."""
    eps = tw_eval.eval_episodes(8)
    perfect = [[tw_eval.Utterance(t, text) for t, (_, text, _) in speech_frames(ep)]
               for ep in eps]
    m = tw_eval.score(eps, perfect)
    assert m['answer_accuracy_all'] == 1.0 and m['revision_recall'] == 1.0
    assert m['false_speak_rate'] == 0.0 and m['silence_recall'] == 1.0
    assert all(tw_eval.meets_targets(m).values())
    silent = tw_eval.score(eps, [[] for _ in eps])
    assert silent['revision_recall'] == 0.0 and silent['answer_accuracy_all'] < 0.5
    by_change = m['revision_recall_by_change']
    assert sum(v['changes'] for v in by_change.values()) == m['revisions']
    assert all(v['hits'] == v['changes'] for v in by_change.values())
    assert {'recolour', 'count'} <= set(by_change)
    assert all(v['hits'] == 0 for v in silent['revision_recall_by_change'].values())
    chatty = tw_eval.score(eps, [[tw_eval.Utterance(t, 'The circle is red.')
                                  for t in range(ep.num_frames)] for ep in eps])
    assert chatty['false_speak_rate'] == 1.0 and not all(tw_eval.meets_targets(chatty).values())
    late = [[tw_eval.Utterance(u.frame + 3, u.text) for u in s] for s in perfect]
    assert tw_eval.score(eps, late)['revision_recall'] < 0.1  # only coincidental repeats


def test_short_training_learns(tmp_path):
    """A few dozen steps cut the loss and write a checkpoint the engine loads."""
    from mossv_ros.engine.config import EngineConfig
    from mossv_ros.engine.runner import ModelRunner
    from mossv_ros.toyworld.train import train, TrainConfig

    info = train(tmp_path / 'm', TrainConfig(steps=40, batch_size=4, episode_frames=12,
                                             text_hidden=32, text_intermediate=64,
                                             vision_hidden=16), progress=False)
    curve = info['loss_curve']
    assert np.mean(curve[-5:]) < 0.5 * np.mean(curve[:5])
    assert (tmp_path / 'm' / 'loss.png').stat().st_size > 1000
    runner = ModelRunner(EngineConfig(model_path=str(tmp_path / 'm')))
    assert runner.vocab_size == info['vocab_size']


def test_quadrant_labels_follow_the_pooled_token_order():
    """The probe's label of cell c is read from pooled token 1 + c: the stride-4 pooling of
    the 8x8 patch grid gives the 56 px quadrants row-major, and every shape stays inside its
    cell's quadrant."""
    from mossv_ros.toyworld.train import quadrant_labels
    from mossv_ros.toyworld.world import CELLS, COLOURS, KINDS

    for c, (x, y) in enumerate(CELLS):
        assert (y // 56) * 2 + x // 56 == c
    for seed in range(30):
        ep = make_episode(seed)
        for t, state in enumerate(ep.states):
            labels = quadrant_labels(state)
            frame = ep.frame(t).astype(int)
            for c in range(4):
                r, q = divmod(c, 2)
                block = frame[56 * r:56 * (r + 1), 56 * q:56 * (q + 1)]
                painted = (np.abs(block - np.array(ep.background)).sum(-1) > 0).sum()
                shape = next((s for s in state.values() if s.cell == c), None)
                if shape is None:
                    assert tuple(labels[c]) == (0, 0) and painted == 0
                else:
                    assert tuple(labels[c]) == (1 + KINDS.index(shape.kind),
                                                1 + list(COLOURS).index(shape.colour))
                    assert painted > 500


def test_attribute_probe_learns_and_stays_out_of_the_checkpoint(tmp_path):
    """With aux_weight > 0 the probe's loss falls, and the written checkpoint holds the plain
    architecture (the same tensors as a run with aux_weight = 0)."""
    from safetensors.torch import load_file

    from mossv_ros.toyworld.train import train, TrainConfig

    small = dict(steps=30, batch_size=4, episode_frames=10, text_hidden=32,
                 text_intermediate=64, vision_hidden=16)
    info = train(tmp_path / 'a', TrainConfig(aux_weight=0.5, **small), progress=False)
    probe = info['probe_loss_curve']
    assert np.mean(probe[-5:]) < 0.7 * np.mean(probe[:5])
    plain = train(tmp_path / 'b', TrainConfig(aux_weight=0.0, **small), progress=False)
    assert 'probe_loss_curve' not in plain
    a = load_file(str(tmp_path / 'a' / 'model.safetensors'))
    b = load_file(str(tmp_path / 'b' / 'model.safetensors'))
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the probe's gradient reached them


def test_scene_probe_reads_image_rows_and_stays_out_of_the_checkpoint(tmp_path):
    """The scene labels give each kind's colour (or absent) of the frame and the change labels
    what differs from the previous frame; the probes read the ``<|image|>`` rows; with
    state_weight > 0 the scene loss falls and the written checkpoint holds the plain
    architecture."""
    from safetensors.torch import load_file

    from mossv_ros.engine.tiny import build_tiny_model, write_tiny_checkpoint
    from mossv_ros.toyworld.data import build_tokenizer
    from mossv_ros.toyworld.train import (
        change_labels,
        model_config,
        scene_labels,
        train,
        TrainConfig,
        Trainer,
    )
    from mossv_ros.toyworld.world import COLOURS, KINDS

    ep = make_episode(5, num_frames=12)
    for state in ep.states:
        labels = scene_labels(state)
        for k, kind in enumerate(KINDS):
            want = 1 + list(COLOURS).index(state[kind].colour) if kind in state else 0
            assert labels[k] == want
    small = dict(steps=80, batch_size=4, episode_frames=10, text_hidden=32,
                 text_intermediate=64, vision_hidden=16)
    tok, sp = build_tokenizer()
    cfg = TrainConfig(state_weight=1.0, **small)
    trainer = Trainer(build_tiny_model(model_config(cfg, sp), seed=0), tok, sp, cfg)
    eps = [make_episode(7, num_frames=6), make_episode(8, num_frames=9)]
    batch = trainer.collate(eps)
    rows, real = trainer.image_rows(batch.frame_pos)  # the rows the probes read
    assert int(real.sum()) == 15
    assert bool((batch.ids.gather(1, rows)[real] == sp['<|image|>']).all())
    assert torch.equal(batch.scenes[batch.frame_map][real],
                       torch.from_numpy(np.stack([scene_labels(s) for e in eps
                                                  for s in e.states])))
    changed = change_labels(batch.scenes[batch.frame_map])
    for b, e in enumerate(eps):
        for t in range(1, e.num_frames):
            before, now = e.states[t - 1], e.states[t]
            assert changed[b, t].tolist() == [
                float((k in now) != (k in before) or (k in now and k in before and
                                                     now[k].colour != before[k].colour))
                for k in KINDS]
    assert changed.sum() > 0 and not changed[:, 0].any()
    with_change = Trainer(build_tiny_model(model_config(cfg, sp), seed=0), tok, sp,
                          TrainConfig(state_weight=1.0, change_weight=1.0, **small))
    total, parts = with_change.losses(batch)
    assert set(parts) == {'lm', 'probe', 'scene', 'change'}
    assert torch.isclose(total, parts['lm'] + cfg.aux_weight * parts['probe'] + parts['scene']
                         + parts['change'])
    info = train(tmp_path / 'a', cfg, progress=False)
    scene = info['scene_loss_curve']
    assert np.mean(scene[-10:]) < 0.93 * np.mean(scene[:10])  # from ln(5) = 1.61: learning
    plain_config = model_config(TrainConfig(**small), sp)
    write_tiny_checkpoint(tmp_path / 'b', config_dict=plain_config,
                          model=build_tiny_model(plain_config, seed=0))
    a = load_file(str(tmp_path / 'a' / 'model.safetensors'))
    b = load_file(str(tmp_path / 'b' / 'model.safetensors'))
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)


def test_shipped_model_was_trained_with_the_documented_defaults():
    """``mossv-ros toyworld train --seed 1`` (the TrainConfig defaults) is what produced the
    committed checkpoint, and the engine loads it like a real checkpoint."""
    from dataclasses import asdict
    import json

    from mossv_ros.engine.config import EngineConfig
    from mossv_ros.engine.runner import ModelRunner
    from mossv_ros.toyworld import shipped_model_dir
    from mossv_ros.toyworld.train import TrainConfig

    info = json.loads((shipped_model_dir() / 'train.json').read_text())
    expected = json.loads(json.dumps(asdict(TrainConfig())))
    assert info['config'] == expected
    assert info['command'].startswith(
        f'mossv-ros toyworld train --out mossv_ros/data/toyworld --seed {TrainConfig.seed} ')
    assert info['wall_sec'] < 15 * 60
    runner = ModelRunner(EngineConfig(model_path=str(shipped_model_dir())))
    assert runner.vocab_size == info['vocab_size']
    assert (shipped_model_dir() / 'model.safetensors').stat().st_size < 8 * 2**20


def test_shipped_model_scores_through_the_engine():
    """Held-out episodes streamed through the engine reproduce the committed evaluation
    (eval.json) and meet the issue's three targets."""
    import json

    from mossv_ros.toyworld import shipped_model_dir

    report = json.loads((shipped_model_dir() / 'eval.json').read_text())
    committed = report['metrics']
    episodes = tw_eval.eval_episodes(committed['episodes'])
    metrics, said = tw_eval.evaluate(shipped_model_dir(), episodes)
    for key in ('answer_accuracy_all', 'revision_recall', 'false_speak_rate', 'silence_recall'):
        assert metrics[key] == pytest.approx(committed[key], abs=0.02), key
    # the targets: answer accuracy >= 0.9, revisions within 2 frames >= 0.9 of the
    # changes, false speech <= 0.05 of quiet frames
    assert all(tw_eval.meets_targets(metrics).values()), tw_eval.meets_targets(metrics)
    # colour changes of the asked shape, the previous model's weak spot (0.48), are caught too
    recolour = metrics['revision_recall_by_change']['recolour']
    assert recolour['hits'] >= 0.9 * recolour['changes']
    assert report['targets'] == tw_eval.meets_targets(committed)


def test_event_weights_shift_the_event_mix():
    """Weighting recolour makes recolour events more frequent, and all-zero weights fall back
    to the uniform mix. (That the default, event_p=None, leaves the evaluation episodes as they
    were is checked by the shipped model reproducing its committed eval.json.)"""
    from collections import Counter

    def mix(**kw):
        counts = Counter()
        for seed in range(60):
            ep = make_episode(seed, **kw)
            for a, b in zip(ep.states, ep.states[1:]):
                if a == b:
                    continue
                if set(a) != set(b):
                    counts['appear' if len(b) > len(a) else 'disappear'] += 1
                else:
                    k = next(k for k in a if a[k] != b[k])
                    counts['recolour' if a[k].cell == b[k].cell else 'move'] += 1
        return counts

    uniform, heavy = mix(), mix(event_p=(1.0, 1.0, 1.0, 4.0))
    share = lambda c: c['recolour'] / sum(c.values())  # noqa: E731
    assert share(heavy) > 1.5 * share(uniform)
    # episodes start with a shape and recolouring never removes one: nothing else happens
    only = mix(event_p=(0.0, 0.0, 0.0, 1.0))
    assert only['recolour'] > 50 and only['appear'] + only['disappear'] + only['move'] == 0
    assert sum(mix(event_p=(0.0, 0.0, 0.0, 0.0)).values()) > 50  # falls back to uniform
