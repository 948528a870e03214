"""Client side: ``mossv-ros ask`` and the terminal view used by the demo."""
import time

import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node


def printable(text: str) -> str:
    """Escape control characters so random-model output cannot garble the terminal."""
    return ''.join(ch if ch.isprintable() or ch == '\n' else f'\\x{ord(ch):02x}'
                   for ch in text)


#: ``only_round`` value meaning "the round is not known yet": messages are held back.
PENDING = object()


class AnswerView(Node):
    """Subscribes to an assistant's token/silence/answer topics and prints them.

    :param only_round: print only this round (None: all rounds; :data:`PENDING`: hold messages
        until :meth:`set_round` names the round, so none is lost while a service call returns).
    """

    def __init__(self, assistant: str, name: str = 'mossv_view', only_round=None, out=print):
        super().__init__(name)
        from mossv_ros.msg import Answer, Silence, Token
        self.only_round = only_round
        self.out = out
        self.finished = set()  # rounds whose final Answer came
        self.answered = set()  # rounds whose first utterance is complete (revision 0)
        self.cancelled = set()  # rounds that ended without running (cancelled, rejected)
        self.answers = []
        self._held = []
        self.create_subscription(Token, f'{assistant}/tokens', self._on_token, 100)
        self.create_subscription(Silence, f'{assistant}/silence', self._on_silence, 10)
        self.create_subscription(Answer, f'{assistant}/answer', self._on_answer, 10)

    def set_round(self, round_id: int) -> None:
        """Show ``round_id`` only, including the messages held back while it was unknown."""
        self.only_round = round_id
        held, self._held = self._held, []
        for handler, msg in held:
            handler(msg)

    def _wanted(self, round_id, handler=None, msg=None):
        if self.only_round is PENDING:
            self._held.append((handler, msg))
            return False
        return self.only_round is None or round_id == self.only_round

    def _on_token(self, msg):
        if self._wanted(msg.round_id, self._on_token, msg):
            self.out(printable(msg.text), end='', flush=True)

    def _on_silence(self, msg):
        if self._wanted(msg.round_id, self._on_silence, msg) and msg.state == msg.STATE_SILENT:
            self.out(f'\n  [silent: observing, frame {msg.frame_index}]', flush=True)

    def _on_answer(self, msg):
        if not self._wanted(msg.round_id, self._on_answer, msg):
            return
        self.answers.append(msg)
        self.out(f'\n  {describe_answer(msg)}', flush=True)
        if msg.is_final:
            self.finished.add(msg.round_id)
            if msg.end_reason.startswith(('cancelled', 'rejected')):
                self.cancelled.add(msg.round_id)
        if msg.revision == 0:
            self.answered.add(msg.round_id)


def describe_answer(msg) -> str:
    """One line for an Answer: which utterance, of which round, how it ended, the frames it
    saw, and its text (or that the model stayed silent)."""
    kind = 'answer' if msg.revision == 0 else f'revision {msg.revision}'
    final = ', final' if msg.is_final else ''
    frames = ('no frame' if msg.first_frame_index < 0 else
              f'frame {msg.first_frame_index}' if msg.first_frame_index == msg.last_frame_index
              else f'frames {msg.first_frame_index}-{msg.last_frame_index}')
    text = printable(msg.text)[:200]
    if not text and msg.is_final and not msg.end_reason.startswith(('cancelled', 'rejected')):
        text = '(the model stayed silent: nothing it saw answered the question)'
    return f'[{kind} (round {msg.round_id}{final}, ended by {msg.end_reason}, {frames})]: {text}'


#: exit codes of ``mossv-ros ask``
EXIT_ANSWERED, EXIT_REFUSED, EXIT_TIMEOUT = 0, 1, 2


def ask(prompt: str, node: str = '/mossv_assistant', timeout_sec: float = 60.0,
        camera: str = '', follow: bool = False) -> int:
    """Call ``<node>/ask`` (about ``camera``, '' = the default one) and print the streamed
    answer: until its first utterance is complete, or with ``follow`` until the round ends
    (revisions included), or the timeout.

    :returns: :data:`EXIT_ANSWERED` (0) once answered (the round may go on: its revisions
        are not waited for without ``follow``), :data:`EXIT_REFUSED` (1) when rejected or
        cancelled, :data:`EXIT_TIMEOUT` (2) on timeout or without the node.
    """
    from mossv_ros.srv import Ask
    rclpy.init()
    view = AnswerView(node, name='mossv_ask', only_round=PENDING)
    executor = SingleThreadedExecutor()
    executor.add_node(view)
    try:
        client = view.create_client(Ask, f'{node}/ask')
        if not client.wait_for_service(timeout_sec=min(timeout_sec, 15.0)):
            print(f'no service {node}/ask (is the assistant running?)')
            return EXIT_TIMEOUT
        end = time.monotonic() + timeout_sec
        while True:
            future = client.call_async(Ask.Request(prompt=prompt, camera=camera))
            executor.spin_until_future_complete(future, timeout_sec=10.0)
            response = future.result()
            # the node serves ~/ask while it loads the model: wait for it to come up
            coming_up = (response is not None and not response.accepted
                         and response.message.startswith('not ready')
                         and 'after an engine error' not in response.message)
            if not coming_up or time.monotonic() > end:
                break
            executor.spin_once(timeout_sec=0.5)
        if response is None or not response.accepted:
            print(f'rejected: {response.message if response else "no response"}')
            return EXIT_REFUSED
        round_id = response.round_id
        print(f'[round {round_id}] {prompt}')
        view.set_round(round_id)

        def done():
            return round_id in view.finished or (not follow and round_id in view.answered)
        while time.monotonic() < end and not done():
            executor.spin_once(timeout_sec=0.1)
        print()
        if round_id in view.cancelled:
            return EXIT_REFUSED
        if round_id in view.answered or round_id in view.finished:
            return EXIT_ANSWERED
        print(f'no answer within {timeout_sec:g} s (--timeout)')
        return EXIT_TIMEOUT
    finally:
        executor.shutdown()
        view.destroy_node()
        rclpy.try_shutdown()
