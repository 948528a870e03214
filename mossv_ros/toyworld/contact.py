"""Contact sheet: an episode's frames with the questions asked and what the model said, so a
person can check answers and revisions against the pixels (matplotlib, Agg backend)."""
from pathlib import Path
import textwrap
from typing import Sequence, Tuple

from .world import Episode


def contact_sheet(episode: Episode, said: Sequence[Tuple[int, str]], path: Path,
                  columns: int = 10, max_frames: int = 40) -> Path:
    """Save a PNG grid of frames 0..n-1; under frame t: the question asked after it (Q, blue)
    and the utterance conditioned on it (A, black; revisions start with "Now").

    :param said: (frame index, text) utterances, e.g. from :func:`.evaluate.evaluate`.
    :returns: ``path``.
    """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    n = min(episode.num_frames, max_frames)
    rows = (n + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.7, rows * 2.5))
    axes = axes.reshape(rows, columns)
    spoken = {}
    for t, text in said:
        spoken.setdefault(t, []).append(text)
    asked = {q.after_frame: q.text for q in episode.questions if not q.interrupt}
    for i in range(rows * columns):
        ax = axes[i // columns, i % columns]
        ax.axis('off')
        if i >= n:
            continue
        ax.imshow(episode.frame(i))
        ax.set_title(f't={i} s', fontsize=8)
        lines = [('A: ' + '\n'.join(textwrap.wrap(s, 20)), 'black') for s in spoken.get(i, [])]
        if i in asked:
            lines.append(('Q: ' + '\n'.join(textwrap.wrap(asked[i], 20)), 'tab:blue'))
        y = -0.05
        for text, colour in lines:
            ax.text(0.0, y, text, transform=ax.transAxes, fontsize=6.5, va='top',
                    color=colour)
            y -= 0.13 * (text.count('\n') + 1)
    fig.suptitle(f'toyworld episode {episode.seed}: frames, questions (Q, asked after the '
                 f'frame) and what the model said (A, at the frame it saw)', fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
