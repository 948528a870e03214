"""``~/answer_question`` (``mossv_ros/action/AnswerQuestion``): a question as a ROS 2 action.

The same rounds as ``~/ask`` and ``~/question`` (one engine, one queue, the same limits): the
goal's prompt is submitted like an Ask; every Token of its round is a feedback message, in
order; the result holds the final text of every utterance and the round's end reason.

* A goal the node cannot serve (loading, inactive, a prompt over the limits) is accepted and
  ends at once ABORTED with ``end_reason`` 'rejected: <why>': ROS 2's goal rejection carries
  no reason, and a behaviour tree needs one.
* Cancel ends the round (the cancelled Answer on ``~/answer``), status CANCELED.
* A round ended by another question ends its goal SUCCEEDED with ``end_reason``
  'interrupted'; deactivate, shutdown, an engine error or a reset end it ABORTED.

Events reach :meth:`AnswerQuestionServer.on_event` from the node's event drain (an executor
thread); a lock makes "submit, then register the goal" atomic for it, so no event of a new
round can be seen before its goal is known.
"""
from dataclasses import dataclass, field
import threading
from typing import Callable, Dict, List

from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.task import Future

from ..engine import events as ev

#: end reasons that end a goal ABORTED (the round did not run to its own end)
ABORTING = ('deactivated', 'shutdown', 'error', 'reset')


@dataclass
class _Goal:
    handle: object
    round_id: int
    done: Future
    texts: Dict[int, str] = field(default_factory=dict)  # revision -> text (so far / final)
    first_frame_index: int = -1
    first_stamp: object = None


class AnswerQuestionServer:
    """The action server of the assistant node.

    :param node: the node (the server lives in every lifecycle state).
    :param submit: ``submit(prompt, request_id, camera) -> (accepted, round_id, message)``.
    :param cancel_round: ``cancel_round(round_id, reason)`` of the engine.
    """

    def __init__(self, node, submit: Callable, cancel_round: Callable[[int, str], None],
                 callback_group=None) -> None:
        from mossv_ros.action import AnswerQuestion
        self._action = AnswerQuestion
        self._submit = submit
        self._cancel_round = cancel_round
        self._lock = threading.Lock()
        self._goals: Dict[int, _Goal] = {}
        self._server = ActionServer(node, AnswerQuestion, '~/answer_question',
                                    execute_callback=self._execute,
                                    goal_callback=lambda request: GoalResponse.ACCEPT,
                                    cancel_callback=self._on_cancel,
                                    callback_group=callback_group)

    async def _execute(self, handle):
        goal = handle.request
        with self._lock:
            accepted, round_id, message = self._submit(goal.prompt, goal.request_id,
                                                       goal.camera)
            if accepted:
                state = _Goal(handle, round_id, Future())
                self._goals[round_id] = state
        if not accepted:
            handle.abort()
            return self._action.Result(end_reason=f'rejected: {message}')
        return await state.done

    def _on_cancel(self, handle) -> CancelResponse:
        with self._lock:
            round_id = next((r for r, g in self._goals.items() if g.handle is handle), None)
        if round_id is not None:
            self._cancel_round(round_id, 'cancelled by the action client')
        return CancelResponse.ACCEPT

    def on_event(self, event) -> None:
        """An engine event, from the node's drain (in order)."""
        with self._lock:
            goal = self._goals.get(getattr(event, 'round_id', 0))
        if goal is None:
            return
        if isinstance(event, ev.TokenEvent):
            revision = event.revision
            goal.texts[revision] = goal.texts.get(revision, '') + event.text
            if goal.first_stamp is None:
                goal.first_stamp = event.source.stamp
            goal.handle.publish_feedback(self._action.Feedback(
                round_id=event.round_id, revision=revision, token_index=event.token_index,
                token=event.text, text=goal.texts[revision]))
        elif isinstance(event, ev.AnswerEvent):
            goal.texts[event.revision] = event.text
            if goal.first_frame_index < 0 and event.revision == 0:
                goal.first_frame_index = event.first_frame_index
            if event.is_final:
                self._finish(goal, event.end_reason, event.last_frame_index,
                             event.source.stamp)
        elif isinstance(event, ev.RoundEvent) and event.kind == 'cancelled':
            self._finish(goal, f'cancelled: {event.reason}', -1, None)

    def _finish(self, goal: _Goal, end_reason: str, last_frame_index: int,
                last_stamp) -> None:
        with self._lock:
            self._goals.pop(goal.round_id, None)
        texts: List[str] = [goal.texts[k] for k in sorted(goal.texts)]
        result = self._action.Result(round_id=goal.round_id, texts=texts,
                                     end_reason=end_reason,
                                     first_frame_index=goal.first_frame_index,
                                     last_frame_index=last_frame_index)
        for name, stamp in (('first_stamp', goal.first_stamp), ('last_stamp', last_stamp)):
            if stamp is not None:
                setattr(result, name, stamp)
        handle = goal.handle
        if handle.is_cancel_requested:
            handle.canceled()
        elif end_reason.startswith('cancelled') or end_reason in ABORTING:
            handle.abort()
        else:
            handle.succeed()
        goal.done.set_result(result)

    def abort_all(self, reason: str) -> None:
        """End every open goal ABORTED (the engine is gone without final events)."""
        with self._lock:
            goals = list(self._goals.values())
        for goal in goals:
            self._finish(goal, reason, -1, None)
