"""Requests in: ``~/question`` (topic), ``~/ask`` (service), ``~/answer_question`` (action) and
``~/reset`` (service), in every lifecycle state.

Every request gets an answer that says what happened: an accepted question ends in exactly
one final Answer; one the node cannot take now (loading, not active, bad input) is refused
with the reason, and what the refusal quotes of the input is bounded
(:func:`~mossv_ros.engine.policy.echo`).
"""
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.qos import QoSProfile, ReliabilityPolicy

from ..engine.policy import echo
from . import convert
from .action import AnswerQuestionServer

#: ~/ask and ~/question: reliable, keep the last 1000 (bursts lose nothing)
REQUEST_QOS = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE)


class RequestIntake:
    """The node's request endpoints, created once (they exist in every lifecycle state, so a
    caller always gets a reason instead of a missing service).

    :param node: the :class:`~.node.AssistantNode` (its engine and lifecycle).
    :param answer_pub: the ``~/answer`` publisher (rejections of ``~/question``).
    """

    def __init__(self, node, answer_pub, callback_group) -> None:
        from mossv_ros.msg import Question
        from mossv_ros.srv import Ask, Reset
        self._node = node
        self._answer_pub = answer_pub
        self.ask_service = node.create_service(Ask, '~/ask', self._on_ask, qos_profile=REQUEST_QOS,
                                               callback_group=callback_group)
        self.reset_service = node.create_service(Reset, '~/reset', self._on_reset,
                                                 callback_group=callback_group)
        self.question_sub = node.create_subscription(Question, '~/question', self._on_question,
                                                     REQUEST_QOS, callback_group=callback_group)
        self.action = AnswerQuestionServer(node, self.submit, self.cancel_round,
                                           callback_group=ReentrantCallbackGroup())

    def submit(self, text: str, request_id: str, camera: str = ''):
        """Hand a question to the engine if the node can take one now.

        :returns: (accepted, round_id, message)."""
        node = self._node
        if node.loading:
            return False, 0, 'not ready: the model is loading'
        if node.configure_error and node.engine is None:
            return False, 0, (f'not ready: configure failed: {node.configure_error} (fix it, '
                              'then configure again)')[:2000]
        if not node.active:
            why = ' after an engine error' if node.engine_failed else ''
            return False, 0, (f'not ready: the node is {node.lifecycle_state()}{why} '
                              '(activate it, or call ~/reset after an error)')
        if node.engine is None:
            return False, 0, 'model not loaded (set model.path)'
        return node.engine.submit_question(text, request_id, camera)

    def cancel_round(self, round_id: int, reason: str) -> None:
        if self._node.engine is not None:
            self._node.engine.cancel_round(round_id, reason)

    def _on_ask(self, request, response):
        response.accepted, response.round_id, response.message = self.submit(
            request.prompt, request.request_id, request.camera)
        return response

    def _on_question(self, msg) -> None:
        accepted, _, message = self.submit(msg.text, msg.request_id, msg.camera)
        if not accepted:
            self._node.get_logger().warning(f'question {echo(msg.request_id, 64)!r} '
                                            f'rejected: {message}')
            self._answer_pub.publish(convert.rejected_answer_msg(
                msg.request_id, msg.text, message, msg.camera))

    def _on_reset(self, request, response):
        node = self._node
        engine = node.engine
        if engine is None:
            response.success, response.message = False, 'model not loaded'
        elif node.engine_failed and not node.active:
            # recover from an engine failure: back to Active through the lifecycle
            ok = (node.lifecycle_state() != 'unconfigured'
                  or node.trigger_configure() == TransitionCallbackReturn.SUCCESS)
            ok = ok and node.trigger_activate() == TransitionCallbackReturn.SUCCESS
            response.success = bool(ok)
            response.message = ('recovered: session reset, node active again' if ok else
                                f'recovery failed: {engine.stats().last_error}')
        else:
            engine.reset('reset service')
            response.success, response.message = True, 'session reset'
        return response
